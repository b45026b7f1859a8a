// The downsample op family: schemas.
//
//   downsample(x, taps, factor, pad)
//   _downsample_backward(grad_out, taps, factor, pad, height, width)
//
// The paper's fixed anti-aliasing Downsampler (Lanczos / Gauss / box kernels)
// as one separable op: per channel, y = decimate_f(k * (k * replicate_pad(x)))
// with the 1-D kernel `taps` (K values, float32, or float64 for double input)
// applied down the columns then along the rows, stride `factor`, `pad`
// replicated pixels on every side (0: the valid correlation). Padding is index
// clamping, never a padded copy; the vertical pass and the strided horizontal
// pass are fused per output row (CPU) or per output tile (CUDA), the f-times
// smaller intermediate staying in a per-thread buffer / shared memory: x is
// read once and y written once. Linear in x, so autograd saves only `taps`
// (K values) and the input size. The backward op is the exact transpose (edge
// pixels collect the replicated border), written as a gather: grad_out read
// once, grad_x written once, no atomics, deterministic on CPU and CUDA. Its
// own derivative is the forward op (double backward).
//
// Kernels: csrc/cpu/downsample.cpp, csrc/cuda/downsample.cu (math in
// csrc/common/downsample*.h). Autograd: registered from Python next to the
// fake kernels, dip_fast/ops/downsample.py (one call per step).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dip_fast, m) {
  m.def("downsample(Tensor x, Tensor taps, int factor, int pad) -> Tensor");
  m.def("_downsample_backward(Tensor grad_out, Tensor taps, int factor, int pad, SymInt height, SymInt width)"
        " -> Tensor");
}

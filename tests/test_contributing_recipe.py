"""CONTRIBUTING.md's recipe "Add a C++/CUDA op", followed with a toy op family.

The family ``toy_scale`` (``y = alpha * x``) is laid out as the recipe says,
in files of its own name: its schemas and C++ autograd in
``csrc/ops/toy_scale.cpp`` (a ``TORCH_LIBRARY_FRAGMENT``; nothing central is
edited), its CPU kernels in ``csrc/cpu/toy_scale.cpp`` (using the package's
``common/`` helpers: argument checks, the output allocator that tests poison,
the layout rule), its fake kernels in Python, and its tests climbing the
shared ladder (tests/op_ladder.py). It is built on the fly with
``torch.utils.cpp_extension.load`` (CPU only), in its own namespace
``dip_fast_toy`` so that it never mixes with the package's ops, in a
temporary folder of the test session (nothing is written to the user's
torch extensions cache). The build takes about a minute, so the tests that
need it are marked slow (``make test-slow``, and a step of CI's own).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dip_fast import _ops

from . import op_ladder as ladder

ROOT = Path(__file__).resolve().parents[1]

# csrc/ops/toy_scale.cpp: the family's schemas, and its autograd beside them.
SCHEMA_CPP = r"""
// The toy_scale op family: schemas and autograd.
//
//   toy_scale(x, alpha)                  y = alpha * x
//   _toy_scale_backward(grad_out, alpha) dx = alpha * grad_out (private: a backward op)
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/op_handle.h"

TORCH_LIBRARY_FRAGMENT(dip_fast_toy, m) {
  m.def("toy_scale(Tensor x, float alpha) -> Tensor");
  m.def("_toy_scale_backward(Tensor grad_out, float alpha) -> Tensor");
}

namespace dip_fast_toy {
namespace {

using Scale = at::Tensor(const at::Tensor&, double);

// Linear in x: nothing saved but alpha; the backward op is the same map, so
// its own derivative is itself (double backward).
template <const char* kOp, const char* kBackwardOp>
class ScaleFunction : public torch::autograd::Function<ScaleFunction<kOp, kBackwardOp>> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double alpha) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = dip_fast::op_handle<Scale>(kOp);
    ctx->saved_data["alpha"] = alpha;
    return op.call(x, alpha);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = dip_fast::op_handle<Scale>(kBackwardOp);
    return {op.call(grads[0], ctx->saved_data["alpha"].toDouble()), at::Tensor()};
  }
};

constexpr char kForward[] = "dip_fast_toy::toy_scale";
constexpr char kBackward[] = "dip_fast_toy::_toy_scale_backward";

at::Tensor toy_scale_autograd(const at::Tensor& x, double alpha) {
  return ScaleFunction<kForward, kBackward>::apply(x, alpha);
}

at::Tensor toy_scale_backward_autograd(const at::Tensor& grad_out, double alpha) {
  return ScaleFunction<kBackward, kBackward>::apply(grad_out, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast_toy, Autograd, m) {
  m.impl("toy_scale", &toy_scale_autograd);
  m.impl("_toy_scale_backward", &toy_scale_backward_autograd);
}

}  // namespace dip_fast_toy
"""

# csrc/cpu/toy_scale.cpp: the CPU kernels, registered for the CPU key.
CPU_CPP = r"""
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "common/alloc.h"
#include "common/checks.h"

namespace dip_fast_toy {
namespace {

at::Tensor scale_cpu(const at::Tensor& x, double alpha) {
  DIP_CHECK_DEVICE(x, at::kCPU, "x");
  DIP_CHECK_FLOATING(x, "x");
  const auto fmt = dip_fast::working_memory_format(x);
  const auto in = x.contiguous(fmt);
  auto out = dip_fast::new_output_like(in, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "toy_scale_cpu", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const float a = static_cast<float>(alpha);
    at::parallel_for(0, in.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if constexpr (std::is_same_v<scalar_t, double>) {
          dst[i] = alpha * src[i];
        } else {
          dst[i] = static_cast<scalar_t>(a * static_cast<float>(src[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast_toy, CPU, m) {
  m.impl("toy_scale", &scale_cpu);
  m.impl("_toy_scale_backward", &scale_cpu);
}

}  // namespace dip_fast_toy
"""

SOURCES = {"csrc/ops/toy_scale.cpp": SCHEMA_CPP, "csrc/cpu/toy_scale.cpp": CPU_CPP}
# cpp_extension.load names objects by file name (both files are toy_scale.cpp), and one translation unit
# builds faster: the build compiles this file, which includes the family's two.
BUILD_UNIT = "".join(f'#include "{rel}"\n' for rel in SOURCES)


def _register_fakes() -> None:
    """dip_fast/ops/toy_scale.py's part: the fake kernels (the layout rule of the C++ kernels)."""
    for name in ("dip_fast_toy::toy_scale", "dip_fast_toy::_toy_scale_backward"):
        torch.library.register_fake(name)(
            lambda x, alpha: torch.empty_like(x, memory_format=_ops.working_memory_format(x))
        )


@pytest.fixture(scope="module")
def toy_ops(tmp_path_factory):
    """Build (in a temporary folder) and load the toy family (CPU only); skip when no compiler is at hand."""
    if not hasattr(torch.ops.dip_fast_toy, "toy_scale"):
        cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
        if not _ops.available():
            pytest.skip(f"the toy follows the package's csrc/common headers and poison switch ({_ops.LOAD_ERROR})")
        if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
            pytest.skip("no C++ compiler or ninja to build the toy op family")
        root = tmp_path_factory.mktemp("toy_scale_build")
        for rel, text in {**SOURCES, "toy_scale_unit.cpp": BUILD_UNIT}.items():
            (root / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "src" / rel).write_text(text)
        with pytest.MonkeyPatch.context() as env:  # for the build only, not the rest of the session
            env.setenv("TORCH_EXTENSIONS_DIR", str(root))
            env.setenv("MAX_JOBS", os.environ.get("MAX_JOBS") or "2")
            # A failing build fails the tests: the recipe must compile.
            cpp_extension.load(
                name="dip_fast_toy_scale",
                sources=[str(root / "src" / "toy_scale_unit.cpp")],
                extra_include_paths=[str(root / "src"), str(ROOT / "csrc")],
                extra_cflags=["-O1"],
                build_directory=str(root),
                is_python_module=False,
                verbose=False,
            )
        _register_fakes()
    return torch.ops.dip_fast_toy


def toy_scale(x: torch.Tensor, alpha: float = 1.5) -> torch.Tensor:
    """The family's public wrapper (dip_fast/ops/toy_scale.py's part)."""
    return torch.ops.dip_fast_toy.toy_scale(x, float(alpha))


def test_schemas_are_fragments_and_backward_is_private():
    assert "TORCH_LIBRARY_FRAGMENT(dip_fast_toy, m)" in SCHEMA_CPP
    assert "TORCH_LIBRARY(" not in SCHEMA_CPP + CPU_CPP
    assert '"_toy_scale_backward(' in SCHEMA_CPP


@pytest.mark.slow  # builds the toy family
@pytest.mark.parametrize("layout", ladder.LAYOUTS)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 0.0), (torch.float32, 0.0), (torch.bfloat16, 0.0)])
def test_rung1_matches_pytorch(toy_ops, layout, dtype, atol):
    x = ladder.as_layout(torch.randn(2, 3, 7, 5, dtype=dtype), layout).requires_grad_(True)
    g = torch.randn(2, 3, 7, 5, dtype=dtype)
    out, _ = ladder.assert_matches(toy_scale, lambda t: t * 1.5, [x], grad=g, atol=atol, grad_atol=atol)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # builds the toy family
def test_rung1_catches_an_unwritten_element(toy_ops):
    """The poisoned outputs make a skipped element fail the first rung."""
    def forgetful(t):
        y = toy_scale(t)
        return torch.where(torch.arange(y.numel()).view(y.shape) == 3, torch.nan, y)

    with pytest.raises(AssertionError, match="unwritten"):
        ladder.assert_matches(forgetful, lambda t: t * 1.5, [torch.randn(1, 2, 3, 3)], atol=0)


@pytest.mark.slow  # builds the toy family
def test_rung2_gradcheck(toy_ops):
    ladder.gradcheck(toy_scale, [torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)])


@pytest.mark.slow  # builds the toy family
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_rung3_opcheck(toy_ops, memory_format):
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=memory_format).requires_grad_(True)
    ladder.opcheck((toy_ops.toy_scale.default, (x, 1.5)), (toy_ops._toy_scale_backward.default, (x.detach(), 1.5)))


@pytest.mark.slow  # builds the toy family
def test_rung4_compiles(toy_ops):
    x = torch.randn(1, 3, 4, 4)
    ladder.compiles(lambda t: toy_scale(t) + 1, [x], expected=x * 1.5 + 1)


@pytest.mark.slow  # builds the toy family
def test_rung5_fuzz(toy_ops):
    pytest.importorskip("hypothesis")

    def check(n, c, h, w, layout, alpha):
        x = ladder.as_layout(torch.randn(n, c, h, w, dtype=torch.float64), layout).requires_grad_(True)
        ladder.assert_matches(lambda t: toy_scale(t, alpha), lambda t: t * alpha, [x],
                              grad=torch.randn(n, c, h, w, dtype=torch.float64), atol=0, grad_atol=0)

    ladder.fuzz(check, examples=25, n=(1, 2), c=(1, 4), h=(1, 9), w=(1, 9), layout=list(ladder.LAYOUTS),
                alpha=(-3.0, 3.0))


@pytest.mark.slow  # builds the toy family
def test_rung6_twin_on_the_cpu(toy_ops):
    """The toy has no CUDA kernel, so the twin rung runs its second side on the CPU too: what is checked here
    is the rung itself. It returns the second run's known result, and fails when the two runs differ, in the
    output or in a gradient only."""
    x = torch.randn(2, 3, 5, 5).requires_grad_(True)
    g = torch.randn(2, 3, 5, 5)
    out, (gx,) = ladder.cuda_twin(toy_scale, [x], grad=g, atol=0, device="cpu")
    torch.testing.assert_close(out, 1.5 * x.detach(), atol=0, rtol=0)
    torch.testing.assert_close(gx, 1.5 * g, atol=0, rtol=0)

    def second_run_differs(in_output: bool):
        runs = []

        def fn(t):
            runs.append(t)
            if len(runs) == 1:
                return toy_scale(t)
            if in_output:
                return toy_scale(t, 1.5 + 1e-3)
            return toy_scale(t).detach() + 2.0 * (t - t.detach())  # the same values, another gradient
        return fn

    with pytest.raises(AssertionError, match="output"):
        ladder.cuda_twin(second_run_differs(True), [x], grad=g, atol=0, device="cpu")
    with pytest.raises(AssertionError, match="gradient of input 0"):
        ladder.cuda_twin(second_run_differs(False), [x], grad=g, atol=0, device="cpu")

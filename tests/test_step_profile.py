"""bench/step_profile.py and step_ledger.py: op names go to their categories, a CPU profile and ledger run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare  # noqa: E402
import step_ledger  # noqa: E402
import step_profile  # noqa: E402

from .conftest import requires_extension  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Names as the profiler reports them: CUDA kernels (cuDNN, PyTorch, dip_fast) and CPU ops.
EXPECTED = {
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
    "cudnn::engines_precompiled::wgrad_alg1_engine<float, 128, 6, 8, 3, 3, 5, false, 512>": "convolution",
    "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816dgrad_optimized_bf16>": "convolution",
    "aten::mkldnn_convolution": "convolution",
    "aten::convolution_backward": "convolution",
    "void cudnn::ops::nchwToNhwcKernel<float, float, float, false, true>": "casts_layout",
    "void bn_stats_cl_kernel<__nv_bfloat16, 8>(BnStatsArgs)": "bn_act",
    "void bn_finalize_sums_kernel(FinalizeArgs)": "bn_act",
    "void at::native::batch_norm_collect_statistics_kernel<float, float, float, int>": "bn_act",
    "void at::native::reflection_pad2d_backward_out_kernel<float>": "bn_act",
    "dip_fast::bn_act": "bn_act",
    "autograd::engine::evaluate_function: torch::autograd::CppNode<dip_fast::(anonymous namespace)::BnActFunction>":
        "bn_act",
    "void upsample_cat_grad_deep_kernel<float, 4>(UpsampleCatArgs)": "upsample_cat",
    "void at::native::upsample_bilinear2d_out_frame<float, float>": "upsample_cat",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 4, 64, 64>": "upsample_cat",
    "aten::cat": "upsample_cat",
    "void at::native::mse_backward_cuda_kernel<float>": "loss",
    "aten::mse_loss": "loss",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "Adam",
    "aten::_fused_adam_": "Adam",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other",
    "void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4>": "other",
    "Memcpy DtoD (Device -> Device)": "casts_layout",
    "aten::copy_": "casts_layout",
    "aten::_to_copy": "casts_layout",
    "aten::clone": "casts_layout",
    "Optimizer.zero_grad#Adam.zero_grad": "zero_grad",
    "aten::normal_": "other",
}


@pytest.mark.parametrize("name, category", EXPECTED.items(), ids=range(len(EXPECTED)))
def test_names_go_to_their_category(name, category):
    assert step_profile.categorize(name) == category


def test_summary_partitions_the_time():
    timed = [("aten::mkldnn_convolution", 3.0), ("aten::mkldnn_convolution", 1.0), ("dip_fast::bn_act", 0.5),
             ("aten::_fused_adam_", 0.25), ("aten::copy_", 0.25)]
    s = step_profile.summarize(timed)
    assert s["total_ms"] == 5.0 and s["kernels"] == 5
    cats = s["categories"]
    assert list(cats) == list(step_profile.CATEGORY_NAMES)
    assert cats["convolution"]["ms"] == 4.0 and cats["convolution"]["largest"][0]["calls"] == 2
    assert cats["upsample_cat"]["ms"] == 0.0 and cats["upsample_cat"]["largest"] == []
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)


@requires_extension
def test_cpu_profile_of_the_eager_step(tmp_path):
    out = tmp_path / "steps.json"
    out.write_text('{"steps": {}}')
    assert step_profile.main(["--device", "cpu", "--sizes", "64", "--rounds", "1", "--warmup", "1",
                              "--merge-into", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["steps"] == {}  # what the file held is kept
    v = data["kernel_profile"]["sizes"]["64"]["fast_cl"]
    cats = v["categories"]
    assert v["total_ms"] > 0 and cats["convolution"]["ms"] > 0 and cats["bn_act"]["ms"] > 0
    assert cats["upsample_cat"]["ms"] > 0 and cats["Adam"]["ms"] > 0
    assert "| 64 | fast_cl |" in "\n".join(step_profile.render(data["kernel_profile"]))


@requires_extension
def test_ledger_splits_the_convolutions_by_direction(tmp_path):
    """The replayed calls carry the FLOPs the meta-device count gives, direction by direction.

    Up to 0.1% more: the fast network's 4-channel 1x1 skip convolutions read
    the padded input the strided convolution beside them reads.
    """
    out = tmp_path / "ledger.json"
    assert step_ledger.main(["--sizes", "64", "--variants", "fast_cl", "--rounds", "1", "--warmup", "1",
                             "--repeats", "1", "--out", str(out)]) == 0
    v = json.loads(out.read_text())["sizes"]["64"]["fast_cl"]
    rows, flops = v["rows"], compare.conv_flops(64)
    forward = rows["conv_forward"]["gflop"] * 1e9
    backward = (rows["conv_input_grad"]["gflop"] + rows["conv_weight_grad"]["gflop"]) * 1e9
    assert flops["forward_flops"] <= forward <= 1.001 * flops["forward_flops"]
    assert flops["backward_flops"] <= backward <= 1.001 * flops["backward_flops"]
    assert rows["conv_forward"]["calls"] == flops["n_convs"]
    # The profile's categories are all there, each with a bound, and the parts add up to the profiled step.
    assert set(rows) == {f"conv_{d}" for d in step_ledger.DIRECTIONS} | (set(step_profile.CATEGORY_NAMES) - {"convolution"})
    assert all(r["bound_ms"] >= 0 for r in rows.values()) and rows["bn_act"]["bytes"] > 0
    assert sum(r["ms"] for r in rows.values()) == pytest.approx(v["total_ms"], rel=1e-9)
    assert (tmp_path / "ledger.md").read_text().startswith("**64², fast_cl**")

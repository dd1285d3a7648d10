"""The step profiler's bookkeeping (its GPU run is recorded in benchmarks/RESULTS.md)."""
import pytest

from benchmarks import profile_step


@pytest.mark.parametrize("name,category", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("_attn_bwd_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("_ln_bwd_kernel", "layer_norm"),
    ("_gelu_fwd_kernel", "gelu"),
    ("_ce_loss_grad_kernel", "cross_entropy"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer_and_ema"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "nccl"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise_reduce"),
    ("Memcpy DtoD (Device -> Device)", "copy_fill"),
])
def test_kernels_fall_into_their_categories(name, category):
    assert profile_step.categorize(name) == category


def test_attention_flops_cover_every_attention_of_the_step():
    one = profile_step.attention_flops_per_step(1, 12, 12, 197, 64, 12, 12, 30)
    assert profile_step.attention_flops_per_step(2, 12, 12, 197, 64, 12, 12, 30) == pytest.approx(2 * one)
    vit_only = profile_step.attention_flops_per_step(1, 12, 12, 197, 64, 0, 12, 30)
    assert vit_only == pytest.approx(12 * 4 * 4.0 * 12 * 197 * 197 * 64)  # fwd+bwd (x3) + momentum fwd (x1)
    assert one > vit_only


def test_markdown_reports_the_step_and_the_categories():
    r = {"batch": 64, "execution": "graph", "activation_checkpointing": False, "device": "GPU", "step_ms": 100.0,
         "img_s": 640.0, "tflops": 200.0, "mfu": 0.25, "matmul_tflops": 800.0, "peak_memory_gib": 17.0,
         "copy_gb_s": 3000.0, "busy_ms": 98.0, "profiled_step_ms": 100.0,
         "categories_ms": {"gemm": 60.0, "attention": 20.0}, "gemm_tflops": 300.0, "attention_tflops": 250.0,
         "top_kernels_ms": [("nvjet", 30.0)]}
    text = profile_step.markdown(r)
    assert "25.0% of the measured 800 TFLOP/s" in text and "| gemm | 60.00 | 61.2% |" in text
    assert "GEMMs: 300 TFLOP/s" in text and "`nvjet`" in text


def test_shared_kv_saving_is_three_of_four_kv_projections():
    """Base sizes: K/V of 197 image tokens (768 -> 768, two matrices) in 12 layers, fwd+bwd, for
    3B ITM rows + B decoder rows in the original, B in the fast path: ~50 GFLOP per sample."""
    saved = profile_step.shared_kv_flops_saved(1, 197, 768, 768, 12)
    assert saved == pytest.approx(2 * 3 * 3 * (2 * 197 * 768 * 768) * 12)
    assert 49e9 < saved < 51e9


def test_kernel_time_is_charged_to_the_blip_fast_line_that_launched_it():
    """CPU stand-in for the GPU attribution: the ViT block's ops are charged to blip_fast's lines."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import blip_fast
    from blip_fast.models.vit import Block

    block = Block(dim=32, num_heads=4, mlp_ratio=2.0, qkv_bias=True)
    x = torch.randn(2, 5, 32)
    config = torch._C._profiler._ExperimentalConfig(verbose=True)
    with blip_fast.use_backend("reference"), \
            profile(activities=[ProfilerActivity.CPU], with_stack=True, experimental_config=config) as prof:
        block(x).sum().backward()
    rows = profile_step.attribute_by_source(prof.events(), steps=1, device=False)
    sources = {src for _, src, _, _ in rows}
    assert any(src.startswith("blip_fast/models/vit.py(") for src in sources), sources
    assert all(ms >= 0 for _, _, ms, _ in rows) and rows == sorted(rows, key=lambda r: -r[2])


def test_the_script_runs_end_to_end_on_the_cpu(tmp_path):
    """The smoke mode (tiny sizes, eager, CPU) goes through the same glue as the GPU run."""
    import json

    code = profile_step.main(["--device", "cpu", "--tiny", "--eager", "--batch", "2", "--steps", "1",
                              "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert result["execution"] == "eager" and result["batch"] == 2 and result["step_ms"] > 0
    assert result["flops_per_step"] > 0 and "categories_ms" in result
    assert "BLIP_Pretrain step, batch 2, eager" in (tmp_path / "profile.md").read_text()


def test_graphs_on_the_cpu_are_refused_with_the_fix():
    with pytest.raises(SystemExit):
        profile_step.main(["--device", "cpu", "--tiny"])

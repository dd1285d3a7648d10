"""The multi-GPU scaling benchmark's bookkeeping (its worker runs in test_distributed.py)."""
from types import SimpleNamespace

import torch

from benchmarks import scaling


def _kernel(name, start, end):
    return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA,
                           time_range=SimpleNamespace(start=start, end=end))


def test_comm_profile_separates_overlapped_and_exposed_nccl_time():
    events = [
        _kernel("ampere_bf16_gemm", 0, 100), _kernel("elementwise", 90, 150),   # compute 0-150
        _kernel("ncclDevKernel_AllReduce_Sum_f32", 120, 200),                    # 30 hidden, 50 exposed
        _kernel("ncclDevKernel_AllGather", 300, 310),                            # 10 exposed
        _kernel("softmax", 305, 400),                                            # overlaps 5 of it
        SimpleNamespace(name="aten::mm", device_type=torch.autograd.DeviceType.CPU,
                        time_range=SimpleNamespace(start=0, end=1000)),
    ]
    out = scaling.comm_profile(events, n_steps=2)
    assert out["nccl_ms_per_step"] == (80 + 10) / 1e3 / 2
    assert out["compute_ms_per_step"] == (150 + 95) / 1e3 / 2
    assert out["exposed_nccl_ms_per_step"] == (50 + 5) / 1e3 / 2


def test_efficiency_table_is_per_gpu_throughput_over_the_one_gpu_run():
    def run(n, step, **kw):
        return dict(strategy="ddp", vit="base", world_size=n, batch_per_gpu=64, median_step_s=step,
                    per_gpu_img_s=64 / step, global_img_s=64 * n / step, straggler_ratio=1.0, tflops_per_gpu=1.0, **kw)

    table = scaling.efficiency_table([run(1, 0.5), run(2, 0.52, no_sync_median_step_s=0.5, nccl_ms_per_step=40.0,
                                                        exposed_nccl_ms_per_step=15.0),
                                      {"strategy": "fsdp", "vit": "large", "world_size": 2, "batch_per_gpu": 64,
                                       "error": "exit 1"}])
    rows = table.splitlines()
    assert len(rows) == 5 and "| 1.000 |" in rows[2]
    assert f"| {0.5 / 0.52:.3f} |" in rows[3] and "40.0 (15.0)" in rows[3]
    assert "failed: exit 1" in rows[4]

"""The pretraining job (``blip-fast pretrain``): config, BLIP's optimiser and schedules, the loop with
exact resume and fault handling, checkpoints, logs and plots."""
from .config import PretrainConfig, apply_overrides, load_config
from .job import JobResult, NonFiniteLossError, PretrainJob, build_model, run_pretrain
from .runtime import Runtime, init_runtime, wrap_for_distributed
from .schedule import alpha_at, build_optimizer, lr_at

__all__ = ["PretrainConfig", "load_config", "apply_overrides", "PretrainJob", "run_pretrain", "build_model",
           "JobResult", "NonFiniteLossError", "Runtime", "init_runtime", "wrap_for_distributed", "lr_at",
           "alpha_at", "build_optimizer"]

"""What a benchmark run records about where it ran."""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import shlex
import subprocess
from typing import Any, Dict, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_ENV = "BLIP_FAST_GIT_COMMIT"


def _version(module: str) -> Optional[str]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # a broken optional package is recorded, not fatal
        return f"not importable ({type(exc).__name__}: {str(exc)[:120]})"
    return getattr(mod, "__version__", "unknown")


def _run(cmd, cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit(override: Optional[str] = None) -> Optional[str]:
    """The commit benchmarked: ``override``, then ``$BLIP_FAST_GIT_COMMIT``, then ``git`` here."""
    if override:
        return override
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if commit is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return commit + ("-dirty" if dirty else "")


def driver_version() -> Optional[str]:
    try:
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def collect(device: torch.device, prog: str, argv, commit_override: Optional[str] = None) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "git_commit": git_commit(commit_override),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "timm": _version("timm"),
        "blip_fast": _version("blip_fast"),
        "device": device.type,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "device_name": torch.cuda.get_device_name(device),
            "device_memory_bytes": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": driver_version(),
        })
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["cuda"] = None
        info["driver"] = None
    return info


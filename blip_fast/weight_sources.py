"""Where weights come from: a state dict, a module, a file, a folder, a URL or a Hugging Face Hub name.

:func:`read_state_dict` turns any of these into a flat ``{key: tensor}`` dict; it is what the
transformers / BERT / timm loaders and ``from_pretrained`` read through. Files load safely:
``.safetensors`` with safetensors, ``.pth`` / ``.bin`` / ``.pt`` with ``torch.load(weights_only=True)``.

Hub names are resolved with ``huggingface_hub.snapshot_download`` (its cache first, the network
when allowed); nothing is downloaded unless a hub name is passed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, extract_state_dict, is_url, read_checkpoint

Tensor = torch.Tensor
WeightsSource = Union[str, os.PathLike, Mapping[str, Any], nn.Module]

#: Weight files looked for in a folder, best first (sharded checkpoints through their index).
FOLDER_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: What a hub snapshot fetches by default: configs and the weight files above (safetensors first).
DEFAULT_HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt")


def _load_safetensors(path: str, device: str = "cpu") -> Dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # transformers depends on safetensors, so this is rare
        raise ImportError(f"reading {path} needs safetensors: pip install safetensors") from exc
    return load_file(path, device=device)


def _load_index(path: str) -> Dict[str, Tensor]:
    """A sharded checkpoint: ``*.index.json`` names the shard holding each key."""
    with open(path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path} has no 'weight_map': not a sharded-checkpoint index")
    folder = os.path.dirname(path)
    out: Dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(read_state_dict(os.path.join(folder, shard)))
    return out


def read_weight_file(path: str) -> Dict[str, Tensor]:
    """The state dict in one local file (``.safetensors``, ``*.index.json``, or a torch pickle)."""
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    if path.endswith(".index.json"):
        return _load_index(path)
    if path.endswith(".npz"):
        raise CheckpointError(f"{path} is a JAX .npz ViT checkpoint: load it with "
                              f"blip_fast.interop.load_timm_vit(visual_encoder, {path!r})")
    return extract_state_dict(read_checkpoint(path))


def find_weight_file(folder: str, names: Sequence[str] = FOLDER_WEIGHT_FILES) -> str:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"no weight file in folder {folder!r}: looked for {', '.join(names)}")


def resolve_hub_folder(name: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                       local_files_only: bool = False,
                       allow_patterns: Optional[Iterable[str]] = DEFAULT_HUB_PATTERNS) -> str:
    """A local folder for a Hugging Face Hub repository id (``'org/name'``), via
    ``huggingface_hub.snapshot_download`` (the cache when it holds the files; the network otherwise
    unless ``local_files_only`` or ``HF_HUB_OFFLINE=1``)."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import validate_repo_id
    except ImportError as exc:
        raise ImportError(
            f"{name!r} is not a local file or folder; fetching it from the Hugging Face Hub needs "
            f"huggingface_hub (pip install huggingface_hub), or pass a local folder") from exc
    try:
        validate_repo_id(name)
    except Exception as exc:
        raise FileNotFoundError(f"{name!r} is neither an existing file or folder nor a Hugging Face Hub "
                                f"repository id ('org/name'): {exc}") from exc
    try:
        return huggingface_hub.snapshot_download(
            repo_id=name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            library_name="blip_fast")
    except Exception as exc:
        offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        hint = ("the files are not in the local cache and the hub may not be contacted (local_files_only / "
                "HF_HUB_OFFLINE=1)" if offline else "is the machine offline, the name misspelt, or the "
                "repository gated (log in with `hf auth login`)?")
        raise CheckpointError(f"{name!r} is no local file or folder, and could not be fetched from the Hugging "
                              f"Face Hub: {hint}. Pass a local folder instead. ({type(exc).__name__}: {exc})") from exc


def resolve_folder(name_or_path: Union[str, os.PathLike], **hub_kwargs: Any) -> str:
    """``name_or_path`` if it is a local folder, else a hub snapshot of it (:func:`resolve_hub_folder`)."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path!r} is a file; a folder (or a hub repository id) is expected here")
    return resolve_hub_folder(path, **hub_kwargs)


def read_state_dict(source: WeightsSource, **hub_kwargs: Any) -> Dict[str, Tensor]:
    """A flat state dict from ``source``.

    ``source``: a mapping (a state dict, or a checkpoint holding one under ``'model'`` /
    ``'state_dict'``), an ``nn.Module`` (its ``state_dict()``), a weight file, a folder holding
    one of :data:`FOLDER_WEIGHT_FILES`, an http(s) URL, or a hub repository id
    (``hub_kwargs``: ``revision``, ``cache_dir``, ``local_files_only``).
    """
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        if source and all(isinstance(v, torch.Tensor) for v in source.values()):
            return dict(source)
        return extract_state_dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights must come from a state dict, a module, a path, a URL or a hub name; "
                        f"got {type(source).__name__}")
    path = os.fspath(source)
    if is_url(path):
        return extract_state_dict(read_checkpoint(path))
    if os.path.isfile(path):
        return read_weight_file(path)
    folder = resolve_folder(path, **hub_kwargs)
    try:
        return read_weight_file(find_weight_file(folder))
    except CheckpointError:
        if os.path.isdir(path) or "allow_patterns" in hub_kwargs:
            raise
    # A hub repository with pickled weights only: fetch those too.
    folder = resolve_hub_folder(path, allow_patterns=DEFAULT_HUB_PATTERNS + ("*.bin",), **hub_kwargs)
    return read_weight_file(find_weight_file(folder))


def read_json(folder: str, name: str = "config.json") -> Optional[Dict[str, Any]]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cached_download(url: str) -> str:
    """A local copy of ``url`` in torch hub's checkpoint cache (downloaded once)."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(url.split("?")[0]))
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=True)
    return path

"""Loading original BLIP checkpoints (``{'model': state_dict, ...}`` ``.pth`` files) safely.

``torch.load`` runs with ``weights_only=True``: a checkpoint cannot execute code. Loading reports
missing, unexpected and shape-mismatched keys instead of dropping them silently.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn

logger = logging.getLogger("blip_fast.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or does not fit the model."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did; compatible with ``load_state_dict``'s result."""

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    #: checkpoint keys dropped because their shape differs: key -> (checkpoint shape, model shape)
    mismatched_keys: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)
    #: pos_embed keys resized: key -> (checkpoint rows, model rows)
    interpolated: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    #: keys added by duplication (NLVR twin cross-attention): new key -> checkpoint key
    duplicated_from: Dict[str, str] = field(default_factory=dict)
    #: checkpoint keys deliberately not loaded (classifier heads, DeiT's dist_token, ...): key -> why
    dropped: Dict[str, str] = field(default_factory=dict)
    #: model keys with no counterpart in the source, left at the model's initialisation by design
    #: (e.g. cross-attention when starting from bert-base-uncased); also listed in missing_keys
    initialized_keys: List[str] = field(default_factory=list)
    #: tensors whose leading rows were copied into a larger / smaller model tensor (vocabulary
    #: resize): key -> (checkpoint shape, model shape)
    resized: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"missing keys ({len(self.missing_keys)}): {self.missing_keys[:20]}"
                 + (" ..." if len(self.missing_keys) > 20 else ""),
                 f"unexpected keys ({len(self.unexpected_keys)}): {self.unexpected_keys[:20]}"
                 + (" ..." if len(self.unexpected_keys) > 20 else "")]
        if self.mismatched_keys:
            lines.append(f"dropped for a shape mismatch: {self.mismatched_keys}")
        if self.interpolated:
            lines.append(f"position embeddings interpolated: {self.interpolated}")
        if self.duplicated_from:
            lines.append(f"keys duplicated for the twin cross-attention: {len(self.duplicated_from)}")
        if self.dropped:
            by_reason: Dict[str, List[str]] = {}
            for key, reason in self.dropped.items():
                by_reason.setdefault(reason, []).append(key)
            lines.append(f"checkpoint keys dropped on purpose ({len(self.dropped)}):")
            lines.extend(f"  {reason}: {len(keys)} key(s), e.g. {keys[:3]}" for reason, keys in by_reason.items())
        if self.initialized_keys:
            lines.append(f"newly initialised model keys ({len(self.initialized_keys)}): {self.initialized_keys[:20]}"
                         + (" ..." if len(self.initialized_keys) > 20 else ""))
        if self.resized:
            lines.append(f"resized (rows copied, the rest initialised): {self.resized}")
        return "\n".join(lines)


def is_url(url_or_filename: str) -> bool:
    return urlparse(str(url_or_filename)).scheme in ("http", "https")


def read_checkpoint(url_or_filename: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a ``.pth`` file or URL with ``weights_only=True`` (URLs download to torch hub's cache)."""
    if is_url(url_or_filename):
        try:
            return torch.hub.load_state_dict_from_url(url_or_filename, map_location=map_location,
                                                      check_hash=False, progress=True, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{url_or_filename} holds more than tensors and plain containers; "
                                  f"refusing to unpickle it (weights_only=True): {exc}") from exc
    path = os.fspath(url_or_filename)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is neither an http(s) URL nor an existing file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers; blip_fast loads checkpoints "
            f"with weights_only=True so that a file cannot run code. Re-save its state dict "
            f"(torch.save({{'model': sd}}, ...)) from a trusted session. Details: {exc}") from exc


def extract_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint (``'model'``, ``'state_dict'`` or the dict itself)."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointError(f"no state dict in the checkpoint (top-level keys: {sorted(checkpoint)[:10]})")


def _interpolate_pos_embeds(model: nn.Module, state_dict: Dict[str, torch.Tensor], names: List[str],
                            report: LoadReport) -> None:
    from .models.vit import interpolate_pos_embed  # models import this module
    for name in names:
        key = f"{name}.pos_embed"
        encoder = getattr(model, name, None)
        if encoder is None or key not in state_dict:
            continue
        before = state_dict[key].shape[-2]
        state_dict[key] = interpolate_pos_embed(state_dict[key], encoder)
        after = state_dict[key].shape[-2]
        if before != after:
            report.interpolated[key] = (before, after)
            logger.info("reshape position embedding %s from %d to %d rows", key, before, after)


def apply_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], report: LoadReport,
                     drop_mismatched: bool = True) -> LoadReport:
    """``load_state_dict(strict=False)``, recording (and with ``drop_mismatched`` skipping) keys
    whose shape differs from the model's."""
    model_state = model.state_dict()
    for key, value in list(state_dict.items()):
        if key in model_state and tuple(value.shape) != tuple(model_state[key].shape):
            report.mismatched_keys[key] = (tuple(value.shape), tuple(model_state[key].shape))
            if drop_mismatched:
                del state_dict[key]
    if report.mismatched_keys and not drop_mismatched:
        raise CheckpointError(f"shape mismatch: {report.mismatched_keys}")
    result = model.load_state_dict(state_dict, strict=False)
    report.missing_keys = list(result.missing_keys)
    report.unexpected_keys = list(result.unexpected_keys)
    return report


def load_checkpoint(model: nn.Module, url_or_filename: str) -> Tuple[nn.Module, LoadReport]:
    """Load an original BLIP checkpoint into ``model`` as ``models/blip.py`` does.

    Interpolates ``visual_encoder.pos_embed`` (and ``visual_encoder_m.pos_embed`` when the model
    has a momentum ViT) to the model's grid, skips keys whose shape differs (reported in
    ``mismatched_keys``), loads the rest with ``strict=False``. Returns ``(model, report)``;
    ``report.missing_keys`` / ``unexpected_keys`` as from ``load_state_dict``.
    """
    state_dict = extract_state_dict(read_checkpoint(url_or_filename))
    report = LoadReport()
    _interpolate_pos_embeds(model, state_dict, ["visual_encoder", "visual_encoder_m"], report)
    apply_state_dict(model, state_dict, report)
    logger.info("load checkpoint from %s\n%s", url_or_filename, report)
    return model, report


def require_complete(report: LoadReport, what: str, allowed_missing: Optional[List[str]] = None) -> None:
    """Raise :class:`CheckpointError` naming the missing keys (the original asserts instead)."""
    missing = [k for k in report.missing_keys if k not in (allowed_missing or [])]
    if missing:
        raise CheckpointError(
            f"the checkpoint for {what} lacks {len(missing)} key(s) the model needs, e.g. {missing[:10]}; "
            f"is it a checkpoint of another model or size (vit='base'/'large', med_config)?")

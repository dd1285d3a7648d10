"""Backend selection for the functional ops.

Every hot op of the models goes through :func:`dispatch`, which picks the implementation from a
registered backend. The requested backend comes from, highest priority first:

1. a :func:`use_backend` context (models with a per-model ``backend`` attribute enter one);
2. the process default set with :func:`set_backend`;
3. the environment variable ``BLIP_FAST_BACKEND``;
4. ``"auto"``.

An explicitly requested backend that cannot run an op raises :class:`BackendUnavailableError`
naming the reason and the fix. ``"auto"`` walks :data:`AUTO_ORDER` and takes the first backend
that supports the call; it logs each fallback once.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

logger = logging.getLogger("blip_fast.ops")

ENV_VAR = "BLIP_FAST_BACKEND"
AUTO = "auto"

#: The order in which ``auto`` tries backends, fastest first. ``reference`` is last and supports
#: everything, so ``auto`` always finds an implementation.
AUTO_ORDER: List[str] = ["cuda", "triton", "flash_attn", "xformers", "sdpa", "reference"]

# A support check returns None when the backend can run the call, else the reason it cannot.
SupportCheck = Callable[..., Optional[str]]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the requested op."""


@dataclass
class Backend:
    """A named set of op implementations.

    ``ops`` maps an op name to its implementation; ``checks`` maps an op name to a function with
    the op's signature that returns None when the call is supported, else a reason string.
    ``unavailable_reason`` is set when the backend cannot run at all in this process (a missing
    package, no GPU), with the fix in the message. ``auto_checks`` hold extra conditions that
    apply only when ``auto`` chooses: calls the backend *can* run but where another backend is
    the better pick (measured slower at that shape, or the Triton CPU interpreter, which is a
    test tool); an explicit request still gets the backend.
    """

    name: str
    ops: Dict[str, Callable[..., Any]] = field(default_factory=dict)
    checks: Dict[str, SupportCheck] = field(default_factory=dict)
    unavailable_reason: Optional[str] = None
    auto_checks: Dict[str, SupportCheck] = field(default_factory=dict)

    def why_not(self, op: str, *args: Any, **kwargs: Any) -> Optional[str]:
        """None when this backend can run ``op`` on these arguments, else the reason."""
        if self.unavailable_reason is not None:
            return self.unavailable_reason
        if op not in self.ops:
            return f"backend {self.name!r} has no implementation of {op!r}"
        check = self.checks.get(op)
        return check(*args, **kwargs) if check is not None else None

    def why_not_auto(self, op: str, *args: Any, **kwargs: Any) -> Optional[str]:
        """Like :meth:`why_not`, plus the conditions under which ``auto`` prefers another backend."""
        reason = self.why_not(op, *args, **kwargs)
        if reason is None:
            check = self.auto_checks.get(op)
            reason = check(*args, **kwargs) if check is not None else None
        return reason


_REGISTRY: Dict[str, Backend] = {}
_LAZY_LOADERS: Dict[str, Callable[[], Backend]] = {}
_context_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "blip_fast_backend", default=None
)
_process_default: Optional[str] = None
_logged_fallbacks: set = set()
# torch.compile cannot trace ContextVar calls: use_backend also keeps its selection on this stack
# (a plain list, which dynamo traces and guards on, so another selection recompiles); with the
# stack empty, the context entered outside the compiled region is read once per trace.
_traced_stack: List[str] = []


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _assume_constant(fn):
    try:
        return torch.compiler.assume_constant_result(fn)
    except AttributeError:  # pragma: no cover - old torch
        return fn


@_assume_constant
def _context_at_trace() -> str:
    """The use_backend context in effect when torch.compile traces (a constant of the graph)."""
    return _context_backend.get() or ""


def register_backend(backend: Backend) -> Backend:
    """Register (or replace) a backend under its name."""
    _REGISTRY[backend.name] = backend
    return backend


def register_lazy_backend(name: str, loader: Callable[[], Backend]) -> None:
    """Register a backend that is built on first use (so importing blip_fast stays cheap)."""
    _LAZY_LOADERS[name] = loader


def get_backend_object(name: str) -> Backend:
    """The :class:`Backend` registered under ``name`` (building a lazy one on first use)."""
    if name not in _REGISTRY and name in _LAZY_LOADERS:
        try:
            register_backend(_LAZY_LOADERS[name]())
        except Exception as exc:  # a broken optional dependency must not break the package
            register_backend(Backend(name, unavailable_reason=f"backend {name!r} failed to load: {exc!r}"))
    if name not in _REGISTRY:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; known backends: {sorted(known_backends())} or {AUTO!r}"
        )
    return _REGISTRY[name]


def load_backends() -> None:
    """Build every lazily registered backend now (models call this when constructed, so that
    code traced by ``torch.compile`` never meets a first-use import)."""
    for name in list(_LAZY_LOADERS):
        get_backend_object(name)


def known_backends() -> List[str]:
    """Every backend name blip_fast knows about, available here or not."""
    return sorted(set(_REGISTRY) | set(_LAZY_LOADERS))


def available_backends() -> Dict[str, Optional[str]]:
    """Map each known backend to None if it can run in this process, else the reason it cannot."""
    return {name: get_backend_object(name).unavailable_reason for name in known_backends()}


def _validate(name: str) -> str:
    if name != AUTO:
        get_backend_object(name)  # raises for unknown names
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` restores the environment / ``auto``)."""
    global _process_default
    _process_default = None if name is None else _validate(name)


def get_backend() -> str:
    """The backend name in effect here: context, then process default, then env var, then auto."""
    if _compiling():
        name = _traced_stack[-1] if _traced_stack else (_context_at_trace() or None)
    else:
        name = _context_backend.get()
    if name is not None:
        return name
    if _process_default is not None:
        return _process_default
    env = os.environ.get(ENV_VAR)
    if env:
        return _validate(env.strip())
    return AUTO


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[str]:
    """Context manager selecting the backend for every op called inside it.

    ``None`` leaves the current selection in place (handy for optional per-model overrides).
    """
    if name is None:
        yield get_backend()
        return
    if _compiling():
        _traced_stack.append(_validate(name))
        try:
            yield name
        finally:
            _traced_stack.pop()
        return
    token = _context_backend.set(_validate(name))
    _traced_stack.append(name)
    try:
        yield name
    finally:
        _traced_stack.pop()
        _context_backend.reset(token)


def resolve(op: str, *args: Any, **kwargs: Any) -> Tuple[str, Callable[..., Any]]:
    """Pick the backend and implementation for one call of ``op``."""
    requested = get_backend()
    if requested != AUTO:
        backend = get_backend_object(requested)
        reason = backend.why_not(op, *args, **kwargs)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run {op}: {reason}. Fix: select another backend "
                f"(blip_fast.use_backend('auto') falls back automatically; available: "
                f"{[n for n, r in available_backends().items() if r is None]})"
            )
        return requested, backend.ops[op]
    reasons = []
    for name in AUTO_ORDER:
        if name not in _REGISTRY and name not in _LAZY_LOADERS:
            continue
        backend = get_backend_object(name)
        reason = backend.why_not_auto(op, *args, **kwargs)
        if reason is None:
            if reasons and not _compiling():
                key = (op, name, tuple(reasons))
                if key not in _logged_fallbacks:
                    _logged_fallbacks.add(key)
                    logger.info("blip_fast auto: %s runs on %r (%s)", op, name, "; ".join(reasons))
            return name, backend.ops[op]
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailableError(f"no backend can run {op}: " + "; ".join(reasons))


def dispatch(op: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the selected backend."""
    _, fn = resolve(op, *args, **kwargs)
    return fn(*args, **kwargs)

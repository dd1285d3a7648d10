"""Helpers shared by the Triton kernels: direct launches from cached plans, dropout seeds and
the RNG mask, output allocation, parameter-gradient reductions, tiling helpers.

Dropout in the kernels is counter-based (Philox through ``tl.rand``): the keep mask of element
``i`` is a pure function of ``(seed, i)``, so the backward pass regenerates it instead of
storing it, and recomputation under activation checkpointing gives the same mask as long as the
same seed is passed. The seed is a device tensor (:func:`draw_seed`), so CUDA graphs stay valid.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Dict, Hashable, Iterator, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl


def next_power_of_2(n: int) -> int:
    """Smallest power of 2 >= n (0 for n <= 0), like ``triton.next_power_of_2``.

    Plain Python: recent triton wraps its own in a JIT object that costs microseconds per call,
    and these run on every launch.
    """
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (plain Python, see :func:`next_power_of_2`)."""
    return -(-a // b)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed: a one-element int64 tensor on ``device``, drawn from torch's generator
    of that device (reproducible under ``torch.manual_seed``).

    The kernels read the seed from memory, so a captured CUDA graph replays with a fresh seed
    each time (torch advances its CUDA generator's Philox offset per replay) and the backward,
    which receives the same tensor, regenerates the forward's mask. Activation checkpointing
    restores the generator state before recomputing, so the recomputation draws the same seed.
    """
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def seed_tensor(seed: "int | torch.Tensor | None", device: torch.device) -> torch.Tensor:
    """``seed`` as the one-element int64 device tensor the kernels read (drawn when None)."""
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"a dropout seed tensor must hold one int32/int64 element, got "
                             f"{seed.dtype} of shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


@triton.jit
def dropout_keep(seed, offsets, p):
    """Boolean keep mask for dropout with probability ``p`` at element ``offsets``."""
    return tl.rand(seed, offsets) >= p


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant on the CPU interpreter).

    Used to size persistent grids, e.g. the per-program partial sums of a parameter gradient.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_warps(block: int) -> int:
    """``num_warps`` for a kernel that reduces one row of ``block`` (a power of 2) elements."""
    if block >= 16384:
        return 16
    if block >= 4096:
        return 8
    if block >= 1024:
        return 4
    return 2



# --------------------------------------------------------------------------------------------
# Launch-side helpers
# --------------------------------------------------------------------------------------------

#: When True, :func:`new_output` fills buffers with NaN so that tests catch elements a kernel
#: forgot to write. Toggle with :func:`poison_outputs`.
POISON_OUTPUTS = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the context, output buffers from :func:`new_output` start as NaN (for tests)."""
    global POISON_OUTPUTS
    previous, POISON_OUTPUTS = POISON_OUTPUTS, enabled
    try:
        yield
    finally:
        POISON_OUTPUTS = previous


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
               order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """An uninitialised kernel output of logical ``shape``.

    ``order`` lays memory out as ``shape`` permuted by ``order`` (outermost first); e.g.
    ``order=(0, 2, 1, 3)`` stores a ``(B, H, L, D)`` tensor as ``(B, L, H, D)``, which a
    following ``transpose(1, 2).reshape(B, L, H * D)`` reads for free. One allocation call,
    no view on top (every torch call costs host time on the launch path).
    """
    shape = tuple(shape)
    out = torch.empty_strided(shape, _strides_for(shape, None if order is None else tuple(order)),
                              dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


@functools.lru_cache(maxsize=4096)
def _strides_for(shape: Tuple[int, ...], order: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    """Strides of ``shape`` stored in the dimension order ``order`` (None: row-major)."""
    order = tuple(range(len(shape))) if order is None else order
    strides = [0] * len(shape)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(1, shape[dim])
    return tuple(strides)


# --------------------------------------------------------------------------------------------
# Direct launches
# --------------------------------------------------------------------------------------------

#: Set to 0 to launch every kernel through triton's JIT (``kernel[grid](...)``) on every call.
DIRECT_LAUNCH_ENV = "BLIP_FAST_TRITON_DIRECT_LAUNCH"
#: Set to 1 to check, on every direct launch, that the arguments specialise exactly as they did
#: when the kernel was compiled (the key each wrapper builds must capture every specialisation).
CHECK_LAUNCH_ENV = "BLIP_FAST_TRITON_CHECK_LAUNCH"


def _direct_launch_supported() -> bool:
    """Triton >= 3.3 calls ``CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata,
    launch_metadata, enter_hook, exit_hook, *every_argument)``; older layouts take the JIT path."""
    if os.environ.get(DIRECT_LAUNCH_ENV, "1") == "0" or interpreting():
        return False
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 3)


def _launch_hooks_active() -> bool:
    """True while a profiler (e.g. proton) hooks kernel launches: those go through the JIT."""
    try:
        from triton import knobs
        runtime = knobs.runtime
    except (ImportError, AttributeError):
        return True
    hook = runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _stream_getters():
    """triton's own ``(current device, current stream of a device)`` functions, so that a
    direct launch goes to the stream the JIT would have used (a capturing one included)."""
    from triton.runtime import driver
    return driver.active.get_current_device, driver.active.get_current_stream


def specialization(args: Sequence[Any], generic: Sequence[bool] = ()) -> Tuple[Any, ...]:
    """What triton's JIT specialises on, per argument: a tensor's dtype and 16-byte alignment,
    an integer being 1, a multiple of 16 or beyond 32 bits (only the last for the parameters
    flagged in ``generic``, the kernel's ``do_not_specialize``). Slow (a Python loop); the launch
    path uses keys built by each wrapper and this only to check them (:data:`CHECK_LAUNCH_ENV`)."""
    spec = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            spec.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            spec.append(type(a))
        elif i < len(generic) and generic[i]:
            spec.append(-2**31 <= a < 2**31)
        else:
            spec.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31))
    return tuple(spec)


def _generic_params(kernel: Any) -> Tuple[bool, ...]:
    """Per parameter of a JITFunction: excluded from value specialisation (do_not_specialize)."""
    params = getattr(kernel, "params", None)
    if not params:
        return ()
    return tuple(bool(getattr(p, "do_not_specialize", False)) for p in params)


class LaunchPlan:
    """Everything about one launch that a wrapper's cache key determines: grid, compile-time
    arguments and options; after the first launch, the compiled kernel's direct-launch handles."""

    __slots__ = ("grid", "constexprs", "options", "direct", "spec", "extra", "on_compiled")

    def __init__(self, grid: Tuple[int, ...], constexprs: Dict[str, Any], num_warps: int,
                 num_stages: Optional[int] = None, extra: Any = None,
                 on_compiled: Optional[Callable[["LaunchPlan", Any], None]] = None):
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexprs = constexprs
        self.options = {"num_warps": num_warps}
        if num_stages is not None:
            self.options["num_stages"] = num_stages
        self.direct = None
        self.spec = None
        self.extra = extra  # anything else the wrapper wants to keep with the plan
        # Called once with the compiled kernel after the first launch (e.g. to size a
        # persistent grid from the registers the kernel actually uses).
        self.on_compiled = on_compiled

    def set_grid(self, grid: Tuple[int, ...]) -> None:
        self.grid = tuple(grid) + (1,) * (3 - len(grid))


class KernelLauncher:
    """Launches one ``@triton.jit`` kernel from a :class:`LaunchPlan`.

    The first launch of a plan goes through the JIT (``kernel[grid](*args, **constexprs)``),
    which compiles or finds the kernel; later launches call the compiled kernel's launcher
    directly, skipping the JIT's per-call argument binding, specialisation, cache-key hashing
    and launch-hook bookkeeping (tens of microseconds of host time per launch). The caller's
    plan cache key must determine every specialisation (see :func:`specialization`): the shapes
    and strides passed as integers and the 16-byte alignment of every tensor argument.
    Constexpr parameters must come after the runtime ones in the kernel signature.
    """

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self._direct = None  # decided on first use (the interpreter may be switched on late)
        self._get_device = self._get_stream = None
        self._generic = _generic_params(kernel)

    def __call__(self, plan: LaunchPlan, args: Sequence[Any]) -> None:
        direct = plan.direct
        if direct is not None and _DIRECT_ENABLED and not _launch_hooks_active():
            if _CHECK_LAUNCH and specialization(args, self._generic) != plan.spec:
                raise RuntimeError(f"{self.kernel.__name__}: a direct launch would reuse a kernel "
                                   f"compiled for other argument properties ({plan.spec} vs "
                                   f"{specialization(args, self._generic)}); the wrapper's plan key "
                                   f"is incomplete")
            run, function, packed, consts = direct
            grid = plan.grid
            run(grid[0], grid[1], grid[2], self._get_stream(self._get_device()), function, packed,
                None, None, None, *args, *consts)
            return
        compiled = self.kernel[plan.grid](*args, **plan.constexprs, **plan.options)
        if self._direct is None:
            self._direct = _direct_launch_supported()
            if self._direct:
                self._get_device, self._get_stream = _stream_getters()
        if self._direct and plan.direct is None:
            plan.direct = self._handles(compiled, plan, args)
            plan.spec = specialization(args, self._generic)
        if plan.on_compiled is not None:
            hook, plan.on_compiled = plan.on_compiled, None
            hook(plan, compiled)
            plan.direct = None  # the hook may change arguments: bind again through the JIT

    def _handles(self, compiled: Any, plan: LaunchPlan, args: Sequence[Any]):
        """``(run, function, packed_metadata, constexpr values)`` or None if unusable."""
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        run = getattr(compiled, "run", None)
        function = getattr(compiled, "function", None)
        packed = getattr(compiled, "packed_metadata", None)
        names = list(self.kernel.arg_names)
        tail = names[len(args):]
        if run is None or function is None or packed is None or set(tail) != set(plan.constexprs):
            return None
        signature = getattr(getattr(compiled, "src", None), "signature", None)
        if signature is not None and len(signature) != len(names):
            return None  # an argument layout this code does not know
        return run, function, packed, tuple(plan.constexprs[n] for n in tail)


_CHECK_LAUNCH = os.environ.get(CHECK_LAUNCH_ENV, "0") == "1"
_DIRECT_ENABLED = True


def set_direct_launch(enabled: bool) -> None:
    """Switch direct launches on or off at run time (benchmarks compare with the JIT path)."""
    global _DIRECT_ENABLED
    _DIRECT_ENABLED = enabled


def set_launch_checks(enabled: bool) -> bool:
    """Turn the per-launch specialisation check of :class:`KernelLauncher` on or off (tests);
    returns the previous setting."""
    global _CHECK_LAUNCH
    previous, _CHECK_LAUNCH = _CHECK_LAUNCH, enabled
    return previous


def resident_programs_per_sm(compiled: Any, num_warps: int, device: torch.device) -> Optional[int]:
    """How many programs of ``compiled`` (a triton CompiledKernel) one SM holds at once, from
    its registers and shared memory; None when the kernel does not say (e.g. the interpreter).

    Persistent grids use it: one program more per SM than fit runs as a second, mostly empty wave.
    """
    n_regs = getattr(compiled, "n_regs", None)
    if not n_regs or device.type != "cuda":
        return None
    props = _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    regs_per_warp = -(-n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    warps = min(props["regs_per_sm"] // regs_per_warp, props["threads_per_sm"] // 32)
    programs = warps // num_warps
    shared = getattr(getattr(compiled, "metadata", None), "shared", 0) or 0
    if shared:
        programs = min(programs, props["smem_per_sm"] // (shared + 1024))
    return max(1, min(programs, 32))


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> Dict[str, int]:
    p = torch.cuda.get_device_properties(index)
    return {"regs_per_sm": getattr(p, "regs_per_multiprocessor", 65536),
            "threads_per_sm": getattr(p, "max_threads_per_multi_processor", 2048),
            "smem_per_sm": getattr(p, "shared_memory_per_multiprocessor", 228 * 1024)}


def align16(t: torch.Tensor) -> bool:
    """Whether ``t``'s data pointer is 16-byte aligned (part of every plan key)."""
    return t.data_ptr() % 16 == 0


def compiling() -> bool:
    """True while ``torch.compile`` traces: the wrappers then call the registered custom ops."""
    return _is_compiling()


try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # pragma: no cover - old torch
    def _is_compiling() -> bool:
        return False


def interpreting() -> bool:
    """True when kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Parameter-gradient partial sums (LayerNorm weight/bias, GELU bias)
# --------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["P"])  # the partial count follows a persistent grid's size
def _sum_partials_kernel(PART1, PART2, OUT1, OUT2, P, N,
                         FIRST: tl.constexpr, SECOND: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N),)``: OUT1/OUT2 (N,) = column sums of the (P, N) float32
    partials PART1/PART2, in a fixed order, cast to the outputs' dtypes."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    s1 = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < P) & col_mask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        if FIRST:
            s1 += tl.load(PART1 + offs, mask=mask, other=0.0)
        if SECOND:
            s2 += tl.load(PART2 + offs, mask=mask, other=0.0)
    if FIRST:
        tl.store(OUT1 + cols, tl.sum(s1, axis=0).to(OUT1.dtype.element_ty), mask=col_mask)
    if SECOND:
        tl.store(OUT2 + cols, tl.sum(s2, axis=0).to(OUT2.dtype.element_ty), mask=col_mask)


_SUM = KernelLauncher(_sum_partials_kernel)
# Narrow column blocks and tall row blocks: the partial counts are a persistent grid's size
# (hundreds of rows), and 128-wide blocks left 6 programs for N = 768, each looping ~25 times.
_SUM_BLOCK_N = 16
_SUM_BLOCK_P = 256


def sum_partials_plan(n: int, first: bool, second: bool) -> LaunchPlan:
    """Plan of :func:`sum_partials` for ``n`` columns and which of the two sums are wanted."""
    return LaunchPlan((cdiv(n, _SUM_BLOCK_N),),
                      dict(FIRST=first, SECOND=second, BLOCK_P=_SUM_BLOCK_P, BLOCK_N=_SUM_BLOCK_N), 4)


def sum_partials(plan: LaunchPlan, part1: Optional[torch.Tensor], part2: Optional[torch.Tensor],
                 out1: Optional[torch.Tensor], out2: Optional[torch.Tensor], rows: int, n: int) -> None:
    """``out = part.sum(0)`` cast to ``out``'s dtype, for one or two ``(rows, n)`` float32 partial
    buffers in one launch (instead of a sum and a cast per buffer); a fixed reduction order."""
    dummy = part1 if part1 is not None else part2
    _SUM(plan, (dummy if part1 is None else part1, dummy if part2 is None else part2,
                dummy if out1 is None else out1, dummy if out2 is None else out2, rows, n))


# --------------------------------------------------------------------------------------------
# Tiling helpers (device side)
# --------------------------------------------------------------------------------------------

@triton.jit
def tile_ptrs(base, offs_r, offs_c, stride_r, stride_c):
    """Pointers to the tile ``base[offs_r, offs_c]`` of a strided 2-D view."""
    return base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c


@triton.jit
def load_tile(ptrs, offs_r, offs_c, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a pointer tile from :func:`tile_ptrs`; rows ``>= n_rows`` / columns ``>= n_cols`` read 0.

    The bounds checks are compile-time switches so that interior tiles load without predicates.
    """
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=offs_c[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def store_tile(ptrs, value, offs_r, offs_c, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Store ``value`` (cast to the pointee type) through a pointer tile, skipping out-of-bounds."""
    value = value.to(ptrs.dtype.element_ty)
    if CHECK_ROWS and CHECK_COLS:
        tl.store(ptrs, value, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols))
    elif CHECK_ROWS:
        tl.store(ptrs, value, mask=offs_r[:, None] < n_rows)
    elif CHECK_COLS:
        tl.store(ptrs, value, mask=offs_c[None, :] < n_cols)
    else:
        tl.store(ptrs, value)


# --------------------------------------------------------------------------------------------
# Launch-configuration tuning (host side)
# --------------------------------------------------------------------------------------------

_TUNED: Dict[Hashable, Any] = {}


def tune(key: Hashable, candidates: Sequence[Any], launch: Callable[[Any], None]) -> Any:
    """The fastest of ``candidates`` for ``key``, timing ``launch(candidate)`` on first use.

    ``launch`` must be idempotent (the kernel fully rewrites its outputs). Candidates that fail
    to compile or run (e.g. out of shared memory) are skipped. The choice is cached per process.
    """
    if key not in _TUNED:
        from triton.testing import do_bench

        best, best_ms = None, float("inf")
        for cand in candidates:
            try:
                ms = do_bench(lambda: launch(cand), warmup=5, rep=25)
            except Exception:  # noqa: BLE001 - an unusable config is simply not a candidate
                continue
            if ms < best_ms:
                best, best_ms = cand, ms
        if best is None:
            raise RuntimeError(f"no launch configuration works for {key!r}")
        _TUNED[key] = best
    return _TUNED[key]


def tuned_configs() -> Dict[Hashable, Any]:
    """A copy of the configurations :func:`tune` picked so far (for benchmarks and logs)."""
    return dict(_TUNED)

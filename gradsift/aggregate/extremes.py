"""Winsorized and trimmed sums without sorting: per-coordinate extremes by min/max
networks (Numba).

The winsorized mean of a coordinate's B values (:mod:`.winsorize`) is the mean of the
values clamped to ``[bottom_{c+1}, top_{c+1}]``, its (c+1)-th smallest and largest; the
trimmed mean (:mod:`.trimmed_mean`, ``k = c``) is that clamped sum less ``c`` times both
bounds, over ``B - 2c``. These kernels keep, for a block of coordinates, their ``c + 1``
largest and smallest values so far, sorted, and merge every pair of new values into them
with a min/max network (the l-th largest of the union is
``max(t_l, min(t_{l-1}, hi), min(t_{l-2}, lo))``): the same operations on every
coordinate of a contiguous row, which the compiler vectorizes. A second pass sums the
clamped values: the sum never holds an outlier that a subtraction would have to cancel
(in float32 that would lose the small values beside it). Measured on one AVX2 core at
B = 256, both passes: 0.4-0.8 ns per value for c = 1..4 and 1.5-1.9 ns for c = 5..12 in
the outer form (2.1-3.0 ns in the batch form, which reads ``x`` from memory), against
2.8-4.6 ns for sorting each coordinate's values.

* :func:`winsorized_batch`: ``x [B, N] -> [N]``, reading ``x`` one contiguous row block
  at a time.
* :func:`winsorized_outer`: the winsorized mean of per-example outer products,
  ``D [B, O], A [B, K] -> [O, K]`` with example i's value ``D[i, o] A[i, k]`` (a Linear
  layer's per-example weight gradients at one position): each value is formed in the
  kernel, so the ``B x O x K`` per-example gradients never exist.

Both return None where they do not apply (Numba missing or :data:`ENABLED` off, not a
CPU float32/float64 tensor, ``c`` above :data:`MAX_C`, a non-finite value); callers then
take their torch path. Work is split over ``torch.get_num_threads()`` threads
(:func:`gradsift.threads.thread_map`; the kernels release the GIL). A kernel is compiled
for each ``c`` and dtype on first use, and cached on disk (:func:`kernel_dir`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..threads import split_range, thread_count, thread_map

#: Largest ``c`` (values winsorized or dropped at each end) with a kernel; larger ``c``
#: takes the callers' sort.
MAX_C = 12
#: Most rows per side kept as ``[rows, width]`` blocks. With more rows LLVM stops
#: vectorizing that layout (too many rows to check for overlap: 4-19 ns per value at
#: c = 5..8 in the first version, against 0.3-0.5 ns at c = 1..4), so wider networks keep
#: their rows at fixed offsets in tiles of :data:`TILE` columns, which it vectorizes.
#: Beyond c = 12 the kernels gain little on the row sort (measured at k = 20-25: within
#: 1.4x, for a 4-5 s compile).
NARROW_LEVELS = 5
#: Coordinates per block of state (``2 (c + 1)`` rows of this many values: in L1 for c <= 3).
BLOCK = 512
#: Columns per tile of the wide networks (a compile-time constant of their loops).
TILE = 64
#: Fewest values (B x coordinates) worth a second thread.
PARALLEL_MIN = 1 << 16
#: Off: every caller takes its torch path (tests compare the two).
ENABLED = True


def available() -> bool:
    """Whether the kernels can run here (Numba importable, :data:`ENABLED`, and no kernel
    failed to compile in this process)."""
    return ENABLED and _has_numba() and not _failed


#: Why the kernels were turned off in this process (a compile failed), or "".
_failed = ""
#: (kind, c, dtype) of the kernels that have run here.
_ran: set[tuple[str, int, str]] = set()


def _run_kernel(kind: str, c: int, dtype: torch.dtype, run: Callable[[tuple[int, int]], None],
                spans: list[tuple[int, int]]) -> bool:
    """``run`` over ``spans`` on the threads; False (with one warning, and the kernels off
    from then on) if the kernel's first use here fails (Numba cannot compile it)."""
    key = (kind, c, str(dtype))
    if key in _ran:
        thread_map(run, spans)
        return True
    global _failed
    try:
        thread_map(run, spans)
    except Exception as exc:  # an import or compile error of Numba/LLVM, on first use only
        _failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"gradsift: a Numba winsorize/trimmed-mean kernel failed to compile ({_failed}); "
                      "using the torch path from now on", RuntimeWarning, stacklevel=3)
        return False
    _ran.add(key)
    return True


@functools.lru_cache(maxsize=1)
def _has_numba() -> bool:
    return importlib.util.find_spec("numba") is not None


def _applies(c: int, *tensors: Tensor) -> bool:
    return (0 < c <= MAX_C and available()
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
                    and not t.requires_grad for t in tensors)
            and len({t.dtype for t in tensors}) == 1)


def winsorized_batch(x: Tensor, c: int) -> Tensor | None:
    """Winsorized mean over the batch axis of ``x [B, N] -> [N]`` (``1 <= c <= (B-1)//2``),
    or None where the kernel does not apply (see the module doc)."""
    return _batch(x, c, trim=False)


def trimmed_batch(x: Tensor, k: int) -> Tensor | None:
    """Mean over the batch axis of ``x [B, N] -> [N]`` without each coordinate's ``k``
    smallest and ``k`` largest values (``1 <= k <= (B-1)//2``), or None where the kernel
    does not apply."""
    return _batch(x, k, trim=True)


def winsorized_outer(d: Tensor, a: Tensor, c: int) -> Tensor | None:
    """Winsorized mean over examples of the outer products ``d[i]^T a[i]``:
    ``d [B, O], a [B, K] -> [O, K]`` (``1 <= c <= (B-1)//2``), or None where the kernel
    does not apply. Assumes every product is finite (the caller checks it once)."""
    return _outer(d, a, c, trim=False)


def trimmed_outer(d: Tensor, a: Tensor, k: int) -> Tensor | None:
    """As :func:`trimmed_batch` over the outer products ``d[i]^T a[i]`` (see
    :func:`winsorized_outer`)."""
    return _outer(d, a, k, trim=True)


def _shape_check(who: str, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.ndim != 2:
            raise ValueError(f"{who}: {name} must be 2-D ([B, ...]), got shape {tuple(t.shape)}")
    if len({t.shape[0] for t in tensors.values()}) > 1:
        raise ValueError(f"{who}: " + " and ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
                         + " need the same batch size (first axis)")


def _kernel_for(form: str, c: int, trim: bool, *tensors: Tensor) -> tuple[str, Callable] | None:
    """``(kind, kernel)`` for ``form`` (``"batch"``/``"outer"``) on ``tensors``, or None
    where no kernel applies (empty tensors included)."""
    if not _applies(c, *tensors) or any(t.numel() == 0 for t in tensors):
        return None
    kind = ("trim-" if trim else "") + form
    kernel = _kernel(kind, c)
    return None if kernel is None else (kind, kernel)


def _state(c: int, width: int, dtype: np.dtype) -> np.ndarray:
    """A kernel's scratch rows (see :func:`_source`): flat tiles, or ``[rows, width]``."""
    if _tiled(c):
        return np.empty(_rows(c) * TILE, dtype=dtype)
    return np.empty((_rows(c), width), dtype=dtype)


def _batch(x: Tensor, c: int, trim: bool) -> Tensor | None:
    _shape_check("trimmed_batch" if trim else "winsorized_batch", x=x)
    b, n = x.shape
    found = _kernel_for("batch", c, trim, x)
    if found is None:
        return None
    kind, kernel = found
    x = x.contiguous()
    if not bool(torch.isfinite(x.sum())):  # any inf/NaN makes the sum so (or an overflow)
        return None
    out = x.new_empty(n)
    xs, outs = x.numpy(), out.numpy()
    tiled = _tiled(c)
    block = TILE if tiled else BLOCK
    whole = n - n % TILE if tiled else n  # a tiled kernel takes whole tiles only

    def run(span: tuple[int, int]) -> None:
        state = _state(c, BLOCK, xs.dtype)
        if span[0] < 0:  # the last, partial tile: padded with zeros
            pad = np.zeros((b, TILE), dtype=xs.dtype)
            pad[:, : n - whole] = xs[:, whole:]
            part = np.empty(TILE, dtype=xs.dtype)
            kernel(pad, 0, TILE, part, state)
            outs[whole:] = part[: n - whole]
            return
        kernel(xs, span[0], span[1], outs, state)

    parts = thread_count(b * n // PARALLEL_MIN)
    spans = [(lo * block, min(whole, hi * block)) for lo, hi in split_range(-(-whole // block), parts)]
    spans = [sp for sp in spans if sp[1] > sp[0]] + ([(-1, -1)] if whole < n else [])
    if not _run_kernel(kind, c, x.dtype, run, spans):
        return None
    return out.div_(b - 2 * c if trim else b)


def _outer(d: Tensor, a: Tensor, c: int, trim: bool) -> Tensor | None:
    _shape_check("trimmed_outer" if trim else "winsorized_outer", d=d, a=a)
    b, o = d.shape
    k = a.shape[1]
    found = _kernel_for("outer", c, trim, d, a)
    if found is None:
        return None
    kind, kernel = found
    a = a.contiguous()
    dt = d.T.contiguous()  # [O, B]: each output's B factors contiguous
    out = a.new_empty(o, k)
    if _tiled(c) and k % TILE:  # whole tiles: a's columns padded with zeros
        a = torch.nn.functional.pad(a, (0, TILE - k % TILE))
    as_, dts, outs = a.numpy(), dt.numpy(), out.numpy()

    def run(span: tuple[int, int]) -> None:
        kernel(as_, dts, span[0], span[1], outs, _state(c, k, as_.dtype))

    if not _run_kernel(kind, c, d.dtype, run, split_range(o, thread_count(b * o * k // PARALLEL_MIN))):
        return None
    return out.div_(b - 2 * c if trim else b)


def _rows(c: int) -> int:
    """Rows of a kernel's state: ``c + 1`` sorted values per side, and the clamped sums."""
    return 2 * (c + 1) + 1


def _network(levels: int, indent: str, at: Callable[[int], str]) -> list[str]:
    """Source lines inserting ``x`` into the sorted top rows ``0..levels`` (largest first)
    and bottom rows ``levels..2 levels`` (smallest first) at column ``j`` (row ``r`` is
    ``at(r)``)."""
    lines = [f"{indent}y = x"]
    for side, (keep, carry), var in ((0, ("vmax", "vmin"), "x"), (levels, ("vmin", "vmax"), "y")):
        for lvl in range(levels):
            row = at(side + lvl)
            lines.append(f"{indent}s = {row}")
            lines.append(f"{indent}{row} = {keep}(s, {var})")
            if lvl < levels - 1:
                lines.append(f"{indent}{var} = {carry}(s, {var})")
    return lines


def _pair_network(levels: int, indent: str, at: Callable[[int], str]) -> list[str]:
    """Source lines merging the pair ``x1, x2`` into the sorted rows at column ``j`` (see
    :func:`_network`): the l-th largest of the union is
    ``max(t_l, min(t_{l-1}, p_hi), min(t_{l-2}, p_lo))`` (terms before ``t_0`` are ``p_hi``, ``p_lo``),
    all from the old rows, so each row is read and written once per pair."""
    lines = [f"{indent}p_hi = vmax(x1, x2)", f"{indent}p_lo = vmin(x1, x2)"]
    for side, (keep, cross) in ((0, ("vmax", "vmin")), (levels, ("vmin", "vmax"))):
        first, second = ("p_hi", "p_lo") if side == 0 else ("p_lo", "p_hi")
        lines += [f"{indent}s{lvl} = {at(side + lvl)}" for lvl in range(levels)]
        for lvl in range(levels):
            terms = [f"s{lvl}"]
            terms.append(first if lvl == 0 else f"{cross}(s{lvl - 1}, {first})")
            if lvl == 1:
                terms.append(second)
            elif lvl >= 2:
                terms.append(f"{cross}(s{lvl - 2}, {second})")
            expr = terms[0]
            for term in terms[1:]:
                expr = f"{keep}({expr}, {term})"
            lines.append(f"{indent}{at(side + lvl)} = {expr}")
    return lines


def _tiled(c: int) -> bool:
    """Whether the kernel for ``c`` keeps its rows in fixed tiles (see :data:`NARROW_LEVELS`)."""
    return c + 1 > NARROW_LEVELS


def _source(kind: str, c: int) -> str:
    """The kernel's source.

    * ``"batch"``: ``kernel(x, lo, hi, out, st)`` writes columns ``[lo, hi)`` of ``out``.
    * ``"outer"``: ``kernel(a, dt, lo, hi, out, st)`` writes rows ``[lo, hi)`` of ``out``.
    * a ``"trim-"`` kind drops the ``c`` extremes instead of winsorizing them.

    Two passes over a block's values: the network keeps the ``c + 1`` largest and
    smallest per column (rows ``0..c`` and ``c+1..2c+1`` of ``st``); then the values
    clamped to the ``(c+1)``-th of each are summed (the last row), so that no sum ever
    holds an outlier that a subtraction would have to cancel. The winsorized sum is that
    sum; the trimmed one is it less ``c`` times both bounds. Up to :data:`NARROW_LEVELS`
    rows per side, ``st`` is ``[rows, width]`` and the column loops run over the block's
    width; above, the rows live in one flat ``st`` at fixed offsets and the loops run
    over tiles of :data:`TILE` columns, both compile-time constants (``x``'s columns
    then come in whole tiles, ``a``'s padded to them).
    """
    trim = kind.startswith("trim-")
    kind = kind.removeprefix("trim-")
    levels, rows, tiled = c + 1, _rows(c), _tiled(c)
    at = (lambda r: f"st[{r * TILE} + j]") if tiled else (lambda r: f"st[{r}, j]")
    fill = ["-np.inf"] * levels + ["np.inf"] * levels + ["0.0"]
    ind = " " * 8
    if kind == "batch":
        head = ["def kernel(xa, lo, hi, out, st):",
                "    b = xa.shape[0]",
                f"    for j0 in range(lo, hi, {'TILE' if tiled else 'BLOCK'}):",
                f"        m = {'TILE' if tiled else 'min(BLOCK, hi - j0)'}"]
        value = lambda i: f"xa[{i}, j0 + j]"  # noqa: E731
        out_width, target = "m", "out[j0 + j]"
    else:
        head = ["def kernel(a, dt, lo, hi, out, st):",
                "    b, kp = a.shape",
                "    kk = out.shape[1]",
                "    for o in range(lo, hi):"]
        if tiled:
            head += ["      for j0 in range(0, kp, TILE):", "        m = TILE"]
            out_width = "min(TILE, kk - j0)"
        else:
            head += ["        j0 = 0", "        m = kp"]
            out_width = "m"
        value = lambda i: f"dt[o, {i}] * a[{i}, j0 + j]"  # noqa: E731
        target = "out[o, j0 + j]"
    body = ind + " " * 8
    total = at(rows - 1) + (f" - {c} * ({at(c)} + {at(levels + c)})" if trim else "")
    lines = head + [
        f"{ind}for j in range(m):", *[f"{ind}    {at(r)} = {fill[r]}" for r in range(rows)],
        f"{ind}for i in range(0, b - 1, 2):",
        f"{ind}    for j in range(m):",
        f"{body}x1 = {value('i')}",
        f"{body}x2 = {value('i + 1')}",
        *_pair_network(levels, body, at),
        f"{ind}if b % 2:",
        f"{ind}    for j in range(m):",
        f"{body}x = {value('b - 1')}",
        *_network(levels, body, at),
        f"{ind}for i in range(b):",
        f"{ind}    for j in range(m):",
        f"{body}{at(rows - 1)} += vmin(vmax({value('i')}, {at(levels + c)}), {at(c)})",
        f"{ind}for j in range({out_width}):",
        f"{ind}    {target} = {total}"]
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, c: int) -> Callable:
    """The Numba kernel ``kind`` (``"batch"``, ``"outer"``, or either with ``"trim-"``) for
    ``c``, compiled per dtype.

    Its source is generated (so that the ``c + 1`` levels are unrolled: a loop over levels
    inside the column loop is not vectorized) and written to :func:`kernel_dir`, so that
    Numba caches the compiled kernel there for later processes; where that directory is
    not writable, the kernel is compiled from memory in every process (about a second).
    None (with one warning, and the kernels off) if Numba does not import."""
    global _failed
    try:
        import numba
    except Exception as exc:  # installed, but broken (e.g. built for another NumPy)
        _failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"gradsift: Numba does not import ({_failed}); winsorize and trimmed_mean use the torch path",
                      RuntimeWarning, stacklevel=3)
        return None
    source = _source(kind, c)
    header = (f"# generated by gradsift.aggregate.extremes\nimport numpy as np\n"
              f"from gradsift.aggregate.numba_ops import vmax, vmin\nBLOCK = {BLOCK}\nTILE = {TILE}\n")
    name = f"extremes_{kind.replace('-', '_')}_c{c}_{hashlib.sha1((header + source).encode()).hexdigest()[:12]}"
    path = _write_once(kernel_dir() / f"{name}.py", header + source + "\n")
    if path is not None:
        spec = importlib.util.spec_from_file_location(f"gradsift_kernel_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # Numba's cache finds the module's globals by name
        spec.loader.exec_module(module)
        return numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True)(module.kernel)
    from .numba_ops import vmax, vmin

    namespace = {"np": np, "BLOCK": BLOCK, "TILE": TILE, "vmax": vmax, "vmin": vmin}
    exec(compile(source, f"<gradsift.aggregate.extremes {kind} c={c}>", "exec"), namespace)
    return numba.njit(fastmath=True, boundscheck=False, nogil=True)(namespace["kernel"])


def kernel_dir() -> Path:
    """Where generated kernels and Numba's cache of them live: ``$GRADSIFT_CACHE_DIR/kernels``,
    else ``$XDG_CACHE_HOME/gradsift/kernels`` (``~/.cache/gradsift/kernels``)."""
    root = os.environ.get("GRADSIFT_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradsift" / "kernels"


def _write_once(path: Path, text: str) -> Path | None:
    """``path`` holding ``text`` (written atomically if missing), or None if it cannot be."""
    try:
        if path.exists() and path.read_text() == text:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            f.write(text)
        os.replace(f.name, path)
        return path
    except OSError:
        return None

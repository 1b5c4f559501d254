"""LLVM's ``maxnum``/``minnum`` as Numba intrinsics, for the generated kernels of
:mod:`gradsift.aggregate.extremes` (imports Numba: import this module only where Numba
is installed).

Python's ``max`` in a Numba kernel compiles to a branch, which becomes a conditional
(masked) store when its result goes back where an operand came from
(``t[j] = max(t[j], x)``) and keeps the loop from vectorizing; the intrinsics compile to
one ``vmaxps``/``vminps`` under fast-math (operands must not be NaN).
"""

from __future__ import annotations

from llvmlite import ir
from numba.extending import intrinsic


def _binary(name: str):
    def op(typingctx, x, y):
        def codegen(context, builder, signature, args):
            fn = builder.module.declare_intrinsic(name, [args[0].type],
                                                  ir.FunctionType(args[0].type, [args[0].type] * 2))
            return builder.call(fn, list(args))
        return x(x, y), codegen
    return op


@intrinsic
def vmax(typingctx, x, y):
    """``max(x, y)`` of two floats of the same type (``llvm.maxnum``)."""
    return _binary("llvm.maxnum")(typingctx, x, y)


@intrinsic
def vmin(typingctx, x, y):
    """``min(x, y)`` of two floats of the same type (``llvm.minnum``)."""
    return _binary("llvm.minnum")(typingctx, x, y)

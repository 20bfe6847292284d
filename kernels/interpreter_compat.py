"""Keep Triton 3.6's CPU interpreter working with NumPy >= 2.4 (triton-lang/triton issue #9171).

The interpreter holds every scalar as a 1-element array and turns it into a Python int with
`int(array)`, which NumPy 2.4 refuses for arrays of ndim > 0. Any loop with a runtime bound,
`for start in range(lo, hi, BLOCK)`, then fails under TRITON_INTERPRET=1. The fix upstream reads the
single element explicitly; `apply()` installs the same conversion for interpreted launches. It changes
nothing on a GPU, where kernels are compiled, and is a no-op once the installed Triton or NumPy no
longer needs it. Remove this file when the pinned Triton contains the upstream fix.
"""
from __future__ import annotations

import numpy as np


def _numpy_refuses_1_element_int() -> bool:
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def apply() -> None:
    """Make the interpreter's tensor.__index__ read the element of its 1-element array (idempotent)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_reads_single_element", False) or not _numpy_refuses_1_element_int():
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Set through the scope, so it is undone with the interpreter's own patches after each launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._reads_single_element = True
    interpreter._patch_lang_tensor = patch_lang_tensor

"""Map an N-d array with a feature axis onto the kernels' two views.

Kernels see C-contiguous memory only: channels-first as (N, C, S) with S the product of
the dims after the feature axis, channels-last (S == 1) as (R, C).  Any dense memory
order is handled without a copy by permuting the axes into memory order first (so an
F-ordered or NHWC-strided array is as fast as a C-ordered one), and outputs are created
in the input's memory order.  Only arrays with gaps or negative strides are copied.
"""
import math

import numpy as np


class Layout:
    """How the user's array maps onto a kernel view (shape-only, no data)."""

    __slots__ = ("shape", "perm", "inverse", "dense_shape", "kernel_shape")

    def __init__(self, shape, perm, dense_shape, kernel_shape):
        self.shape = shape                # the user's shape
        self.perm = perm                  # axes in memory order, None = already C order
        self.inverse = None if perm is None else tuple(np.argsort(perm))
        self.dense_shape = dense_shape    # shape after the permutation (C-contiguous)
        self.kernel_shape = kernel_shape  # (N, C, S) or (R, C)

    @property
    def kernel_dims(self):
        """(N, C, S) for the kernels; S == 1 means channels-last rows."""
        shape = self.kernel_shape
        return (shape[0], shape[1], shape[2] if len(shape) == 3 else 1)

    def kernel_view(self, a):
        """a (of the user's shape) as a C-contiguous kernel-shaped array; a copy only if
        a's memory is not dense in this layout's order."""
        dense = a if self.perm is None else a.transpose(self.perm)
        if not dense.flags.c_contiguous:
            dense = np.ascontiguousarray(dense)
        return dense.reshape(self.kernel_shape)

    def kernel_view_or_none(self, a):
        """Like kernel_view but None instead of a copy (for outputs written in place)."""
        dense = a if self.perm is None else a.transpose(self.perm)
        return dense.reshape(self.kernel_shape) if dense.flags.c_contiguous else None

    def to_user(self, kernel_array):
        """A kernel-shaped array back in the user's shape and memory order (a view)."""
        dense = kernel_array.reshape(self.dense_shape)
        return dense if self.perm is None else dense.transpose(self.inverse)

    def new_kernel_array(self, dtype):
        return np.empty(self.kernel_shape, dtype=dtype)


def plan(x, axis):
    """The Layout for array x (validated: ndim >= 2, 0 <= axis < ndim, non-empty)."""
    if x.flags.c_contiguous:
        perm = None
    elif x.flags.f_contiguous:
        perm = tuple(range(x.ndim - 1, -1, -1))
    else:
        perm = tuple(sorted(range(x.ndim), key=lambda a: (-x.strides[a], a)))
        if not x.transpose(perm).flags.c_contiguous:
            perm = None                   # not dense in any order: kernel_view copies
    dense_shape = x.shape if perm is None else tuple(x.shape[a] for a in perm)
    dense_axis = axis if perm is None else perm.index(axis)
    outer = math.prod(dense_shape[:dense_axis])
    channels = dense_shape[dense_axis]
    inner = math.prod(dense_shape[dense_axis + 1:])
    kernel_shape = (outer, channels) if inner == 1 else (outer, channels, inner)
    return Layout(x.shape, perm, dense_shape, kernel_shape)

"""Map an N-d array with a feature axis onto the kernels' view of it.

Kernels see C-contiguous memory as (N, C, S): channels-first with S the product of the
dims after the feature axis, channels-last when S == 1 (then N counts rows).  Any dense
memory order is handled without a copy by permuting the axes into memory order first (so
an F-ordered or NHWC-strided array is as fast as a C-ordered one), and outputs are created
in the input's memory order.  Only arrays with gaps or negative strides are copied.
"""
import math
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

_CACHE_SIZE = 256
_cache: dict[tuple[tuple[int, ...], tuple[int, ...], int, int], "Layout"] = {}


class Layout:
    """How arrays of one shape, memory order and feature axis map onto the kernels."""

    __slots__ = ("shape", "perm", "inverse", "dense_shape", "kernel_dims", "size")

    def __init__(self, shape: tuple[int, ...], perm: tuple[int, ...] | None,
                 dense_shape: tuple[int, ...], kernel_dims: tuple[int, int, int]) -> None:
        self.shape = shape                # the user's shape
        self.perm = perm                  # axes in memory order; None = already C order
        self.inverse: tuple[int, ...] | None = (
            None if perm is None else tuple(np.argsort(perm)))
        self.dense_shape = dense_shape    # shape after the permutation (C-contiguous)
        self.kernel_dims = kernel_dims    # (N, C, S); S == 1 means channels-last rows
        self.size = math.prod(shape)      # elements

    def dense(self, a: NDArray[Any]) -> NDArray[Any]:
        """a (of the user's shape) permuted into this layout's memory order, C-contiguous;
        a copy only if a's memory is not dense in that order."""
        dense = a if self.perm is None else a.transpose(self.perm)
        return dense if dense.flags.c_contiguous else np.ascontiguousarray(dense)

    def dense_or_none(self, a: NDArray[Any]) -> NDArray[Any] | None:
        """Like dense but None instead of a copy (for outputs written in place)."""
        dense = a if self.perm is None else a.transpose(self.perm)
        return dense if dense.flags.c_contiguous else None

    def to_user(self, dense: NDArray[Any]) -> NDArray[Any]:
        """A dense array back in the user's axis order (a view, in the input's memory order)."""
        return dense if self.perm is None else dense.transpose(self.inverse)

    def new_dense(self, dtype: DTypeLike) -> NDArray[Any]:
        return np.empty(self.dense_shape, dtype=dtype)


def plan(x: NDArray[Any], axis: int) -> Layout:
    """The Layout for array x (validated: ndim >= 2, 0 <= axis < ndim, non-empty).
    Layouts are cached by (shape, strides, itemsize, axis), every fact the layout is
    derived from (the same byte strides are another memory order for another itemsize):
    a training loop plans once."""
    key = (x.shape, x.strides, x.itemsize, axis)
    layout = _cache.get(key)
    if layout is None:
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        layout = _cache[key] = _make_layout(x, axis)
    return layout


def _make_layout(x: NDArray[Any], axis: int) -> Layout:
    perm: tuple[int, ...] | None
    if x.flags.c_contiguous:
        perm = None
    elif x.flags.f_contiguous:
        perm = tuple(range(x.ndim - 1, -1, -1))
    else:
        perm = tuple(sorted(range(x.ndim), key=lambda a: (-x.strides[a], a)))
        if not x.transpose(perm).flags.c_contiguous:
            perm = None                   # not dense in any order: dense() copies
    dense_shape = x.shape if perm is None else tuple(x.shape[a] for a in perm)
    dense_axis = axis if perm is None else perm.index(axis)
    kernel_dims = (math.prod(dense_shape[:dense_axis]), dense_shape[dense_axis],
                   math.prod(dense_shape[dense_axis + 1:]))
    return Layout(x.shape, perm, dense_shape, kernel_dims)

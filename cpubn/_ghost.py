"""GhostBatchNorm: Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017).

A training batch is split along axis 0 into consecutive "ghost batches" of
ghost_batch_size samples (the last may be smaller), each normalized with its own
statistics; the backward differentiates each chunk through its own statistics and sums
the parameter gradients over chunks.  The running statistics get one update per call,
from the size-weighted mean of the chunks' means and of their unbiased variances.

Each chunk is a view x[start:stop]: for data whose axis 0 is outermost in memory (C-order
NCHW or NHWC, (N, C) rows) it is a dense slab the kernels read in place, so a ghost step
is the same work as a BatchNorm step over the whole batch, done by one kernel call per
chunk inside one layer call (each call splits its chunk over the threads as usual).
"""
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from . import _dispatch
from ._layout import Layout, plan
from ._module import BatchNorm
from ._validation import check_batch_stats_possible, check_positive_int

_FLOAT64 = np.dtype(np.float64)


class GhostSaved:
    """What a ghost forward leaves for backward and for the running statistics.

    ``chunks``: (start, stop, Saved) per ghost batch.  ``mean`` / ``batch_var``: the exact
    mean and biased variance of the whole batch (the chunks' statistics Chan-merged in
    float64), as BatchNorm's Saved reports them to _track_batch and its hooks
    (cpubn.precise_statistics).  ``ghost_var``: the size-weighted mean of the chunks'
    unbiased variances, for GhostBatchNorm's own running update.  x_dense / layout /
    y_dense / residual play the roles they have in _dispatch.Saved for BatchNorm.backward's
    checks (x_dense is the whole input, y_dense the whole output when it is the ReLU mask).
    """

    __slots__ = ("x_dense", "layout", "y_dense", "residual", "chunks", "mean", "batch_var",
                 "ghost_var")

    def __init__(self, x: NDArray[Any], layout: Layout, y: NDArray[Any], relu: bool, residual: bool,
                 chunks: list[tuple[int, int, _dispatch.Saved]]) -> None:
        self.x_dense = x
        self.layout = layout
        self.y_dense = y if relu else None
        self.residual = residual
        self.chunks = chunks
        counts = np.array([chunk.x_dense.size // chunk.channels for _, _, chunk in chunks],
                          dtype=_FLOAT64)[:, None]
        means = np.stack([chunk.mean for _, _, chunk in chunks])
        variances = np.stack([chunk.batch_var for _, _, chunk in chunks])
        total = counts.sum()
        fractions = counts / total
        self.mean = (fractions * means).sum(axis=0)
        # Chan's merge of (count, mean, M2): within-chunk plus between-chunk squares.
        self.batch_var = (fractions * (variances + (means - self.mean) ** 2)).sum(axis=0)
        self.ghost_var = (fractions * (variances * (counts / (counts - 1)))).sum(axis=0)


class GhostBatchNorm(BatchNorm):
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017): in training, each
    consecutive chunk of ``ghost_batch_size`` samples along axis 0 (the last may be
    smaller) is normalized with its own batch statistics.

    ``GhostBatchNorm(C, ghost_batch_size)`` has BatchNorm's interface otherwise (``axis``,
    ``dtype``, ``affine``, ``track_running_stats``, ``momentum``, ``activation``, ``out=``,
    ``residual=``, state dicts, save / load).  The feature axis must not be axis 0 (the
    batch axis being split).

    * Backward: each chunk's gradient flows through its own statistics; grad_weight and
      grad_bias are summed over the chunks.
    * Running statistics: one update per training call, with the size-weighted mean of
      the chunks' means and the size-weighted mean of the chunks' unbiased variances.
    * Eval mode is BatchNorm's eval mode (without running statistics, the whole batch's
      statistics, as BatchNorm).  ``ghost_batch_size >= N`` is BatchNorm.
    * A chunk with a single value per channel raises BatchNorm's error (before anything
      runs).
    """

    def __init__(self, num_features: int, ghost_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, axis: int = 1,
                 dtype: DTypeLike = np.float32, activation: str | None = None) -> None:
        ghost_batch_size = check_positive_int(ghost_batch_size, "ghost_batch_size")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=axis, dtype=dtype,
                         activation=activation)
        if self.axis == 0:
            raise ValueError("GhostBatchNorm splits the batch along axis 0, so the feature "
                             "axis cannot be 0")
        self._ghost_batch_size = ghost_batch_size

    @property
    def ghost_batch_size(self) -> int:
        """Samples per ghost batch (a positive int; may be changed between calls)."""
        return self._ghost_batch_size

    @ghost_batch_size.setter
    def ghost_batch_size(self, value: int) -> None:
        self._ghost_batch_size = check_positive_int(value, "ghost_batch_size")

    # ------------------------------------------------------------------ kernels
    def _forward_batch_stats(self, x: NDArray[Any], axis: int, weight: NDArray[Any] | None,
                             bias: NDArray[Any] | None, out: NDArray[Any] | None,
                             residual: NDArray[Any] | None, relu: bool) -> tuple[NDArray[Any], Any]:
        size = self._ghost_batch_size
        n = x.shape[0]
        if not self.training or size >= n:
            return super()._forward_batch_stats(x, axis, weight, bias, out, residual, relu)
        if axis == 0:
            raise ValueError(f"GhostBatchNorm splits the batch along axis 0, so the feature "
                             f"axis cannot be 0 (axis={self.axis} for input of shape "
                             f"{x.shape})")
        starts = range(0, n, size)
        check_batch_stats_possible(x[starts[-1]:], axis)   # the smallest chunk is the last
        layout = plan(x, axis)
        y = layout.to_user(layout.new_dense(x.dtype)) if out is None else out
        chunks: list[tuple[int, int, _dispatch.Saved]] = []
        for start in starts:
            stop = min(n, start + size)
            _, saved = _dispatch.forward(
                x[start:stop], axis, weight, bias, self.eps, y[start:stop],
                params_checked=True, relu=relu,
                residual=None if residual is None else residual[start:stop])
            chunks.append((start, stop, saved))
        return y, GhostSaved(x, layout, y, relu, residual is not None, chunks)

    def _track_batch(self, saved: Any, count: int) -> None:
        if not isinstance(saved, GhostSaved):
            return super()._track_batch(saved, count)
        tracked = self.num_batches_tracked + 1     # type: ignore[operator]  # only when tracking
        factor = 1.0 / tracked if self.momentum is None else self.momentum
        self.running_mean[...] = ((1.0 - factor) * self.running_mean.astype(_FLOAT64)
                                  + factor * saved.mean)
        self.running_var[...] = ((1.0 - factor) * self.running_var.astype(_FLOAT64)
                                 + factor * saved.ghost_var)
        self.num_batches_tracked = tracked
        return None

    def _backward_kernel(self, dy: NDArray[Any], saved: Any, weight: NDArray[Any] | None,
                         out: NDArray[Any] | None) -> _dispatch.BackwardResult:
        if not isinstance(saved, GhostSaved):
            return super()._backward_kernel(dy, saved, weight, out)
        layout = saved.layout
        dx = layout.to_user(layout.new_dense(dy.dtype)) if out is None else out
        dresidual = layout.to_user(layout.new_dense(dy.dtype)) if saved.residual else None
        grads = np.zeros(2 * self.num_features)
        for start, stop, chunk in saved.chunks:
            _, chunk_grads, chunk_dresidual = _dispatch.backward(dy[start:stop], chunk,
                                                                 weight, dx[start:stop])
            grads += chunk_grads
            if dresidual is not None:
                dresidual[start:stop] = chunk_dresidual
        return dx, grads, dresidual

    # ------------------------------------------------------------------ state
    def _config(self) -> dict[str, Any]:
        return dict(super()._config(), ghost_batch_size=self._ghost_batch_size)

    def __repr__(self) -> str:
        activation = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"GhostBatchNorm({self.num_features}, ghost_batch_size="
                f"{self._ghost_batch_size}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}{activation})")

"""The small-batch remedies: three answers to batches too small or not i.i.d. enough
for BatchNorm's batch statistics.

* BatchRenorm: Batch Renormalization (Ioffe, 2017), a BatchNorm whose training output is
  corrected towards the running statistics, so that training and inference agree even
  when mini-batches are small or not i.i.d.

  Per channel, with the running statistics taken before this step's update:

      sigma_B = sqrt(var_B + eps),   sigma = sqrt(running_var + eps)
      r = clip(sigma_B / sigma, 1/rmax, rmax),   d = clip((mean_B - running_mean) / sigma, -dmax, dmax)
      y = weight * (xhat * r + d) + bias,   xhat = (x - mean_B) / sigma_B

  r and d are per-channel constants, so they fold into the scale and shift the
  normalization pass applies: y = (x - mean_B) * invstd_B * (weight * r) + (bias + weight * d).
  The backward treats them as constants (the paper's choice): dx is BatchNorm's training
  backward with weight * r, grad_weight = sum(dy * (xhat * r + d)) = r * sum(dy * xhat)
  + d * sum(dy), grad_bias = sum(dy).

* GhostBatchNorm: Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017).

  A training batch is split along axis 0 into consecutive "ghost batches" of
  ghost_batch_size samples (the last may be smaller), each normalized with its own
  statistics; the backward differentiates each chunk through its own statistics and sums
  the parameter gradients over chunks.  The running statistics get one update per call,
  from the size-weighted mean of the chunks' means and of their unbiased variances.

  Each chunk is a view x[start:stop]: for data whose axis 0 is outermost in memory (C-order
  NCHW or NHWC, (N, C) rows) it is a dense slab the kernels read in place, so a ghost step
  is the same work as a BatchNorm step over the whole batch, done by one kernel call per
  chunk inside one layer call (each call splits its chunk over the threads as usual).

* precise_statistics: exact population statistics for normalization layers ("PreciseBN",
  Wu & Johnson, 2021).

  Running averages trail a model whose weights are still moving; recomputing each layer's
  statistics over a number of batches with the final weights closes the train/inference
  gap.  Inside the block every layer runs in training mode, and the statistics each
  training forward reports to its running-statistics hook (``_track_batch(saved, count)``:
  the batch's mean and biased variance over ``count`` values per channel; global ones for a
  SyncBatchNorm) are merged exactly instead of being averaged in.
"""
import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .._core import dispatch
from .._core.layout import Layout, plan
from .._core.validation import check_batch_stats_possible, check_positive_int
from .batchnorm import BatchNorm

_FLOAT64 = np.dtype(np.float64)


# ------------------------------------------------------------------------- BatchRenorm

def _check_limit(value: object, name: str, lowest: float) -> float:
    """rmax (>= 1) or dmax (>= 0): a real number, NaN refused, +inf allowed (no clipping)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float >= {lowest:g}, got {value!r}")
    limit = float(value)
    if not limit >= lowest:            # also refuses NaN
        raise ValueError(f"{name} must be a float >= {lowest:g} (or inf), got {limit!r}")
    return limit


class RenormSaved(dispatch.Saved):
    """A training forward's Saved (batch statistics, batch_stats=True) plus the r and d
    (float64, per channel) it applied: the backward's constants."""

    __slots__ = ("r", "d")

    def __init__(self, batch: dispatch.Saved, normalized: dispatch.Saved, r: NDArray[np.float64],
                 d: NDArray[np.float64]) -> None:
        super().__init__(batch.x_dense, batch.layout, batch.stats, True, normalized.y_dense,
                         normalized.residual)
        self.r = r
        self.d = d


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe, 2017): BatchNorm that stays consistent with its
    running statistics in training, for small or non-i.i.d. mini-batches.

    ``BatchRenorm(C, rmax=3.0, dmax=5.0)`` has BatchNorm's interface (``axis``, ``dtype``,
    ``affine``, ``momentum``, ``activation``, ``out=``, ``residual=``, state dicts, save /
    load) and always tracks running statistics.  In training the batch-normalized value
    x̂ = (x - mean_B) / sigma_B becomes ``x̂ * r + d`` with

    * ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and
    * ``d = clip((mean_B - running_mean) / sigma, -dmax, dmax)``,

    ``sigma_B = sqrt(var_B + eps)`` (biased batch variance), ``sigma = sqrt(running_var +
    eps)``, the running statistics being those before this step's update; then
    ``y = weight * (x̂ * r + d) + bias``.  The running statistics are updated as BatchNorm
    updates them.  The backward treats r and d as constants, as in the paper.  Eval mode is
    BatchNorm's eval mode, and ``rmax=1, dmax=0`` is BatchNorm.

    ``rmax`` (>= 1) and ``dmax`` (>= 0, ``inf`` allowed) are attributes the training loop may
    change between steps; the paper starts at 1 and 0 and relaxes them
    (:func:`cpubn.renorm_schedule`).  Assigning a value out of range raises ValueError.

    The r and d of the last training forward are kept in ``last_r`` / ``last_d``
    (float64, None before one).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, axis: int = 1, dtype: DTypeLike = np.float32,
                 rmax: float = 3.0, dmax: float = 5.0, activation: str | None = None) -> None:
        # Checked first: a bad limit must not leave a half-built layer behind.
        rmax = _check_limit(rmax, "rmax", 1.0)
        dmax = _check_limit(dmax, "dmax", 0.0)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, axis=axis, dtype=dtype,
                         activation=activation)
        self._rmax = rmax
        self._dmax = dmax
        # None before the first training forward (typed like BatchNorm's arrays)
        self.last_r: NDArray[np.float64] | Any = None
        self.last_d: NDArray[np.float64] | Any = None

    @property
    def rmax(self) -> float:
        """Upper clip of r (and 1/rmax the lower one); >= 1, 1 means r = 1."""
        return self._rmax

    @rmax.setter
    def rmax(self, value: float) -> None:
        self._rmax = _check_limit(value, "rmax", 1.0)

    @property
    def dmax(self) -> float:
        """Clip of |d|; >= 0, 0 means d = 0."""
        return self._dmax

    @dmax.setter
    def dmax(self, value: float) -> None:
        self._dmax = _check_limit(value, "dmax", 0.0)

    def renorm_factors(self, mean: ArrayLike,
                       var: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(r, d) in float64 for batch statistics ``mean`` and biased ``var`` (per channel),
        against the current running statistics and limits."""
        batch_mean = np.asarray(mean, dtype=_FLOAT64)
        batch_var = np.asarray(var, dtype=_FLOAT64)
        sigma = np.sqrt(self.running_var.astype(_FLOAT64) + self.eps)
        r = np.clip(np.sqrt(batch_var + self.eps) / sigma, 1.0 / self._rmax, self._rmax)
        d = np.clip((batch_mean - self.running_mean.astype(_FLOAT64)) / sigma,
                    -self._dmax, self._dmax)
        return r, d

    # ------------------------------------------------------------------ kernels
    def _forward_batch_stats(self, x: NDArray[Any], axis: int, weight: NDArray[Any] | None,
                             bias: NDArray[Any] | None, out: NDArray[Any] | None,
                             residual: NDArray[Any] | None, relu: bool) -> tuple[NDArray[Any], Any]:
        # Two kernel calls: the batch statistics alone (x read, nothing written), then the
        # eval kernel with those statistics and the folded scale weight*r and shift
        # bias + weight*d, adding the residual and applying the ReLU in its single pass.
        # x is read twice and y written once (a channels-last BatchNorm step's traffic).
        check_batch_stats_possible(x, axis)
        batch = dispatch.batch_statistics(x, axis, self.eps)
        r, d = self.renorm_factors(batch.mean, batch.batch_var)
        scale: NDArray[Any] = r
        shift: NDArray[Any] = d
        if weight is not None:
            w64 = weight.astype(_FLOAT64)
            scale, shift = w64 * r, w64 * d
        if bias is not None:
            shift = shift + bias
        y, normalized = dispatch.forward(x, axis, scale, shift, self.eps, out,
                                          running_mean=batch.mean,
                                          running_var=batch.batch_var, residual=residual,
                                          relu=relu)
        self.last_r, self.last_d = r, d
        return y, RenormSaved(batch, normalized, r, d)

    def _backward_kernel(self, dy: NDArray[Any], saved: Any, weight: NDArray[Any] | None,
                         out: NDArray[Any] | None) -> dispatch.BackwardResult:
        if not isinstance(saved, RenormSaved):          # after an eval-mode forward
            return super()._backward_kernel(dy, saved, weight, out)
        scale = saved.r if weight is None else np.asarray(weight, _FLOAT64) * saved.r
        dx, grads, dresidual = dispatch.backward(dy, saved, scale, out)
        channels = saved.channels
        # The kernel's grad_weight is sum(dy * xhat) whatever the weight; with r, d:
        grads[:channels] = grads[:channels] * saved.r + grads[channels:] * saved.d
        return dx, grads, dresidual

    # ------------------------------------------------------------------ state
    def _config(self) -> dict[str, Any]:
        config = super()._config()
        del config["track_running_stats"]
        config.update(rmax=self._rmax, dmax=self._dmax)
        return config

    def __repr__(self) -> str:
        activation = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"BatchRenorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, axis={self.axis}, rmax={self._rmax}, "
                f"dmax={self._dmax}{activation})")


def renorm_schedule(step: int, *, rmax: float = 3.0, dmax: float = 5.0,
                    warmup_steps: int = 5000, rmax_steps: int = 40000,
                    dmax_steps: int = 25000) -> tuple[float, float]:
    """(rmax, dmax) for training step ``step`` on the Batch Renormalization paper's
    schedule: 1 and 0 (plain BatchNorm) for the first ``warmup_steps``, then linear ramps
    reaching ``rmax`` at step ``rmax_steps`` and ``dmax`` at step ``dmax_steps``, constant
    after.  The defaults are the paper's (5k, 40k, 25k steps; 3 and 5): scale the step
    counts to your run's length.

        layer.rmax, layer.dmax = cpubn.renorm_schedule(step, warmup_steps=500,
                                                       rmax_steps=4000, dmax_steps=2500)
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    rmax = _check_limit(rmax, "rmax", 1.0)
    dmax = _check_limit(dmax, "dmax", 0.0)
    if not (math.isfinite(rmax) and math.isfinite(dmax)):
        raise ValueError("renorm_schedule ramps to finite limits; got an infinite one")
    for name, value in (("warmup_steps", warmup_steps), ("rmax_steps", rmax_steps),
                        ("dmax_steps", dmax_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if rmax_steps < warmup_steps or dmax_steps < warmup_steps:
        raise ValueError(f"rmax_steps ({rmax_steps}) and dmax_steps ({dmax_steps}) must be "
                         f">= warmup_steps ({warmup_steps})")

    def ramp(start: float, end: float, reached: int) -> float:
        if step <= warmup_steps:
            return start
        if step >= reached:
            return end
        return start + (end - start) * (step - warmup_steps) / (reached - warmup_steps)

    return ramp(1.0, rmax, rmax_steps), ramp(0.0, dmax, dmax_steps)


# ---------------------------------------------------------------------- GhostBatchNorm

class GhostSaved:
    """What a ghost forward leaves for backward and for the running statistics.

    ``chunks``: (start, stop, Saved) per ghost batch.  ``mean`` / ``batch_var``: the exact
    mean and biased variance of the whole batch (the chunks' statistics Chan-merged in
    float64), as BatchNorm's Saved reports them to _track_batch and its hooks
    (cpubn.precise_statistics).  ``ghost_var``: the size-weighted mean of the chunks'
    unbiased variances, for GhostBatchNorm's own running update.  x_dense / layout /
    y_dense / residual play the roles they have in dispatch.Saved for BatchNorm.backward's
    checks (x_dense is the whole input, y_dense the whole output when it is the ReLU mask).
    """

    __slots__ = ("x_dense", "layout", "y_dense", "residual", "chunks", "mean", "batch_var",
                 "ghost_var")

    def __init__(self, x: NDArray[Any], layout: Layout, y: NDArray[Any], relu: bool, residual: bool,
                 chunks: list[tuple[int, int, dispatch.Saved]]) -> None:
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
        chunks: list[tuple[int, int, dispatch.Saved]] = []
        for start in starts:
            stop = min(n, start + size)
            _, saved = dispatch.forward(
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
        dispatch.update_running_stats(self.running_mean, self.running_var, saved.mean,
                                       saved.ghost_var, factor, self._batches)
        return None

    def _backward_kernel(self, dy: NDArray[Any], saved: Any, weight: NDArray[Any] | None,
                         out: NDArray[Any] | None) -> dispatch.BackwardResult:
        if not isinstance(saved, GhostSaved):
            return super()._backward_kernel(dy, saved, weight, out)
        layout = saved.layout
        dx = layout.to_user(layout.new_dense(dy.dtype)) if out is None else out
        dresidual = layout.to_user(layout.new_dense(dy.dtype)) if saved.residual else None
        grads = np.zeros(2 * self.num_features)
        for start, stop, chunk in saved.chunks:
            _, chunk_grads, chunk_dresidual = dispatch.backward(dy[start:stop], chunk,
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


# ------------------------------------------------------------------ precise_statistics

class _PopulationStatistics:
    """(count, mean, M2) per channel in float64, merged batch by batch with Chan et al.'s
    pairwise update: exact for any sequence of batch sizes (no E[x^2] - E[x]^2)."""

    def __init__(self, layer: BatchNorm) -> None:
        self.layer = layer
        self.count = 0
        self.mean: NDArray[np.float64] | None = None
        self.m2: NDArray[np.float64] | None = None
        self.batches = 0

    def add(self, saved: Any, count: int) -> None:
        """The _track_batch hook: one training forward's statistics."""
        # A SyncBatchNorm's statistics are those of the global batch: its own _track_batch
        # replaces the local count that BatchNorm.forward passes by the global count of
        # its last exchange, kept in _sync_count; this hook must do the same.
        count = getattr(self.layer, "_sync_count", None) or count
        batch_mean = np.array(saved.mean, dtype=_FLOAT64)
        batch_m2 = np.array(saved.batch_var, dtype=_FLOAT64) * count
        if self.mean is None:
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            total = self.count + count
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + batch_m2 + delta * delta * (self.count * count / total)
        self.count += count
        self.batches += 1

    @property
    def unbiased_var(self) -> NDArray[np.float64]:
        # (read only after a batch: m2 is an array)
        return self.m2 / (self.count - 1)  # type: ignore[operator, return-value]


@contextlib.contextmanager
def precise_statistics(layers: Iterable[BatchNorm]) -> Iterator[None]:
    """``with cpubn.precise_statistics(layers): ...`` replaces the layers' running
    statistics by the exact statistics of the data they see inside the block.

    ``layers``: an iterable of cpubn normalization layers (BatchNorm and its subclasses:
    BatchRenorm, GhostBatchNorm, SyncBatchNorm, LazyBatchNorm) with running statistics;
    anything else in it is a TypeError, a layer without running statistics a ValueError.
    Inside the block the layers are in training mode (they normalize with batch
    statistics as usual) and their running statistics do not change.  On a normal exit,
    for each layer that ran at least one forward:

    * ``running_mean`` / ``running_var`` are the mean and unbiased variance of everything
      it saw in the block, as if it had been one batch (merged exactly, in float64);
    * ``num_batches_tracked`` has grown by the number of its forwards;

    and every layer is back in the mode it had before.  A layer that ran no forward keeps
    its statistics.  If the block raises, statistics, counters and modes are left exactly
    as they were.  Blocks over the same layer cannot be nested.

    Run the forwards on training data with the final weights (no backward needed), e.g.
    100 batches: the statistics are then the model's, not a trailing average's.
    """
    unique: dict[int, BatchNorm] = {}
    for layer in list(layers):
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"precise_statistics takes cpubn normalization layers, got "
                            f"{type(layer).__name__}")
        if not layer.track_running_stats:
            raise ValueError(f"{layer!r} has no running statistics (track_running_stats="
                             f"False)")
        if "_track_batch" in vars(layer):
            raise ValueError(f"{layer!r} is already inside a precise_statistics block")
        unique[id(layer)] = layer
    distinct = list(unique.values())
    modes = [layer.training for layer in distinct]
    accumulators = [_PopulationStatistics(layer) for layer in distinct]
    try:
        for layer, accumulator in zip(distinct, accumulators):
            # An instance attribute shadows the class's hook (BatchNorm's or a subclass's
            # override) for this object only; deleting it restores the class's.
            layer._track_batch = accumulator.add  # type: ignore[method-assign]
            layer.train()
        yield
    finally:
        for layer, mode in zip(distinct, modes):
            vars(layer).pop("_track_batch", None)
            layer.train(mode)
    for layer, accumulator in zip(distinct, accumulators):
        if accumulator.batches:
            layer.running_mean[...] = accumulator.mean
            layer.running_var[...] = accumulator.unbiased_var
            # (an int: track_running_stats was checked)
            layer.num_batches_tracked += accumulator.batches    # type: ignore[operator]

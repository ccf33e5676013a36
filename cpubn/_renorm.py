"""BatchRenorm: Batch Renormalization (Ioffe, 2017), a BatchNorm whose training output is
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
"""
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _dispatch
from ._module import BatchNorm
from ._validation import check_batch_stats_possible

_FLOAT64 = np.dtype(np.float64)


def _check_limit(value: object, name: str, lowest: float) -> float:
    """rmax (>= 1) or dmax (>= 0): a real number, NaN refused, +inf allowed (no clipping)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float >= {lowest:g}, got {value!r}")
    limit = float(value)
    if not limit >= lowest:            # also refuses NaN
        raise ValueError(f"{name} must be a float >= {lowest:g} (or inf), got {limit!r}")
    return limit


class RenormSaved(_dispatch.Saved):
    """A training forward's Saved (batch statistics, batch_stats=True) plus the r and d
    (float64, per channel) it applied: the backward's constants."""

    __slots__ = ("r", "d")

    def __init__(self, batch: _dispatch.Saved, normalized: _dispatch.Saved, r: NDArray[np.float64],
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
        batch = _dispatch.batch_statistics(x, axis, self.eps)
        r, d = self.renorm_factors(batch.mean, batch.batch_var)
        scale: NDArray[Any] = r
        shift: NDArray[Any] = d
        if weight is not None:
            w64 = weight.astype(_FLOAT64)
            scale, shift = w64 * r, w64 * d
        if bias is not None:
            shift = shift + bias
        y, normalized = _dispatch.forward(x, axis, scale, shift, self.eps, out,
                                          running_mean=batch.mean,
                                          running_var=batch.batch_var, residual=residual,
                                          relu=relu)
        self.last_r, self.last_d = r, d
        return y, RenormSaved(batch, normalized, r, d)

    def _backward_kernel(self, dy: NDArray[Any], saved: Any, weight: NDArray[Any] | None,
                         out: NDArray[Any] | None) -> _dispatch.BackwardResult:
        if not isinstance(saved, RenormSaved):          # after an eval-mode forward
            return super()._backward_kernel(dy, saved, weight, out)
        scale = saved.r if weight is None else np.asarray(weight, _FLOAT64) * saved.r
        dx, grads, dresidual = _dispatch.backward(dy, saved, scale, out)
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

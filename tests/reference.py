"""Independent float64 NumPy reference for Batch Normalization (the test oracle).

Written for clarity, not speed, and never calls cpubn. Every input is cast to
float64 first, so a float32 array is treated as the exact values it holds.
The channel axis is moved last and the array flattened to rows of shape (M, C):
every per-channel statistic is then a plain ``axis=0`` reduction.

Semantics follow PyTorch: biased batch variance to normalize, unbiased batch
variance (M / (M - 1)) for the running variance, ``momentum=None`` means a
cumulative average with factor ``1 / num_batches_tracked`` (incremented first).
"""

import numpy as np


def normalize_axis(axis, ndim):
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for ndim {ndim}")
    return axis % ndim


def to_rows(a, axis):
    """float64 (M, C) view of ``a`` with the channel axis last."""
    a64 = np.asarray(a, dtype=np.float64)
    ax = normalize_axis(axis, a64.ndim)
    return np.moveaxis(a64, ax, -1).reshape(-1, a64.shape[ax])


def from_rows(rows, shape, axis):
    """Inverse of :func:`to_rows` for an array of ``shape``."""
    ax = normalize_axis(axis, len(shape))
    moved = tuple(d for i, d in enumerate(shape) if i != ax) + (shape[ax],)
    return np.moveaxis(rows.reshape(moved), -1, ax)


def as64(v, C):
    """A per-channel vector as float64, or ones/zeros-free None passthrough."""
    if v is None:
        return None
    v = np.asarray(v, dtype=np.float64)
    assert v.shape == (C,)
    return v


def batch_stats(x, axis=1):
    """(mean, biased variance, elements per channel) in float64."""
    rows = to_rows(x, axis)
    mean = rows.mean(axis=0)
    var = ((rows - mean) ** 2).mean(axis=0)
    return mean, var, rows.shape[0]


def invstd_of(var, eps):
    return 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)


def normalize(x, mean, invstd, weight=None, bias=None, axis=1):
    """y = (x - mean) * invstd * weight + bias, float64, shape of x."""
    rows = to_rows(x, axis)
    C = rows.shape[1]
    y = (rows - as64(mean, C)) * as64(invstd, C)
    if weight is not None:
        y = y * as64(weight, C)
    if bias is not None:
        y = y + as64(bias, C)
    return from_rows(y, np.shape(x), axis)


def updated_running(running, batch, momentum):
    """(1 - momentum) * running + momentum * batch, in float64."""
    running = np.asarray(running, dtype=np.float64)
    return (1.0 - momentum) * running + momentum * np.asarray(batch, dtype=np.float64)


def functional_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1):
    """Mirror of torch.nn.functional.batch_norm.

    Returns (y, save_mean, save_invstd, new_running_mean, new_running_var);
    the running values are float64 (None when not given).
    """
    if training:
        mean, var, M = batch_stats(x, axis)
        new_rm, new_rv = running_mean, running_var
        if running_mean is not None:
            new_rm = updated_running(running_mean, mean, momentum)
        if running_var is not None:
            new_rv = updated_running(running_var, var * M / (M - 1), momentum)
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
        new_rm, new_rv = running_mean, running_var
    invstd = invstd_of(var, eps)
    y = normalize(x, mean, invstd, weight, bias, axis)
    return y, mean, invstd, new_rm, new_rv


def backward(dy, x, mean, invstd, weight=None, training=True, axis=1):
    """(dx, dweight, dbias) in float64.

    training=True: gradient through the batch statistics (mean and biased
    variance of ``x``; ``mean``/``invstd`` must be those statistics).
    training=False: statistics are constants, dx = dy * weight * invstd.
    """
    drows = to_rows(dy, axis)
    xrows = to_rows(x, axis)
    C = xrows.shape[1]
    mean, invstd = as64(mean, C), as64(invstd, C)
    w = np.ones(C) if weight is None else as64(weight, C)
    xhat = (xrows - mean) * invstd
    dweight = (drows * xhat).sum(axis=0)
    dbias = drows.sum(axis=0)
    if training:
        # d/dx of (x - mean(x)) / sqrt(var(x) + eps), var biased.
        dx = w * invstd * (drows - drows.mean(axis=0) - xhat * (drows * xhat).mean(axis=0))
    else:
        dx = drows * w * invstd
    return from_rows(dx, np.shape(x), axis), dweight, dbias


def round_to(v, dtype):
    """Store a float64 vector in ``dtype`` and read it back as float64."""
    if v is None:
        return None
    return np.asarray(v, dtype=dtype).astype(np.float64)


class RefBatchNorm:
    """Stateful reference with torch.nn.BatchNorm semantics.

    Parameters, gradients and running statistics are stored as float64
    rounded to ``dtype`` (the storage dtype of the object under test); all
    arithmetic is float64.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32,
                 weight=None, bias=None, running_mean=None, running_var=None,
                 num_batches_tracked=0):
        C = num_features
        self.num_features, self.eps, self.momentum = C, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.axis, self.dtype, self.training = axis, dtype, True
        if affine:
            self.weight = round_to(np.ones(C) if weight is None else weight, dtype)
            self.bias = round_to(np.zeros(C) if bias is None else bias, dtype)
            self.grad_weight = np.zeros(C)
            self.grad_bias = np.zeros(C)
        else:
            self.weight = self.bias = self.grad_weight = self.grad_bias = None
        if track_running_stats:
            self.running_mean = round_to(np.zeros(C) if running_mean is None else running_mean, dtype)
            self.running_var = round_to(np.ones(C) if running_var is None else running_var, dtype)
            self.num_batches_tracked = int(num_batches_tracked)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.saved = None

    @classmethod
    def like(cls, bn):
        """Reference copy of a cpubn.BatchNorm's current state (reads attributes only)."""
        ref = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  bn.axis, bn.dtype, weight=bn.weight, bias=bn.bias,
                  running_mean=bn.running_mean, running_var=bn.running_var,
                  num_batches_tracked=bn.num_batches_tracked or 0)
        ref.training = bn.training
        if bn.affine:
            ref.grad_weight = np.asarray(bn.grad_weight, dtype=np.float64).copy()
            ref.grad_bias = np.asarray(bn.grad_bias, dtype=np.float64).copy()
        return ref

    def forward(self, x):
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            mean, var, M = batch_stats(x, self.axis)
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                factor = (1.0 / self.num_batches_tracked if self.momentum is None
                          else self.momentum)
                self.running_mean = round_to(
                    updated_running(self.running_mean, mean, factor), self.dtype)
                self.running_var = round_to(
                    updated_running(self.running_var, var * M / (M - 1), factor), self.dtype)
        else:
            mean, var = self.running_mean, self.running_var
        invstd = invstd_of(var, self.eps)
        self.saved = (np.asarray(x, dtype=np.float64).copy(), mean, invstd, use_batch_stats)
        return normalize(x, mean, invstd, self.weight, self.bias, self.axis)

    __call__ = forward

    def backward(self, dy):
        x, mean, invstd, through_stats = self.saved
        dx, dw, db = backward(dy, x, mean, invstd, self.weight, through_stats, self.axis)
        if self.affine:
            self.grad_weight = round_to(self.grad_weight + dw, self.dtype)
            self.grad_bias = round_to(self.grad_bias + db, self.dtype)
        return dx

"""Minimal NumPy layers for the cpubn examples: an example, not a framework.

Every layer has the same three-part shape as ``cpubn.BatchNorm``:

* ``layer(x)`` runs the forward pass and remembers what the backward pass needs;
* ``layer.backward(dy)`` returns ``dx`` and *accumulates* parameter gradients;
* ``zero_grad()`` clears them (a layer without parameters simply has none).

So a network is just a Python list of layers, ``cpubn.BatchNorm`` objects included, and
:func:`forward`, :func:`backward` and :func:`sgd_step` below walk that list.
Arrays are float32 throughout, cpubn's default parameter dtype.
"""
from contextlib import contextmanager

import numpy as np

import cpubn

DTYPE = np.float32


# ---------------------------------------------------------------------------------------
# Layers with parameters
# ---------------------------------------------------------------------------------------
class _WeightAndBias:
    """Parameter bookkeeping shared by Linear and Conv2d (bias optional)."""

    def parameters(self):
        """(parameter, gradient) pairs, updated in place by :func:`sgd_step`."""
        pairs = [(self.weight, self.grad_weight)]
        if self.bias is not None:
            pairs.append((self.bias, self.grad_bias))
        return pairs

    def zero_grad(self):
        for _, grad in self.parameters():
            grad[...] = 0


class Linear(_WeightAndBias):
    """y = x @ weight + bias for x of shape (N, in_features).

    ``weight`` starts as Gaussian noise with standard deviation ``init_std``; ``bias=False``
    drops the bias, as the BatchNorm paper does for a layer followed by BatchNorm (the
    normalization subtracts the mean, so a bias there would have no effect).
    """

    def __init__(self, in_features, out_features, rng, init_std, bias=True):
        self.weight = (rng.standard_normal((in_features, out_features)) * init_std).astype(DTYPE)
        self.bias = np.zeros(out_features, DTYPE) if bias else None
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias) if bias else None

    def __call__(self, x):
        self._x = x
        y = x @ self.weight
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy):
        self.grad_weight += self._x.T @ dy
        if self.bias is not None:
            self.grad_bias += dy.sum(axis=0)
        return dy @ self.weight.T


class Conv2d(_WeightAndBias):
    """2-D convolution, stride 1, zero padding, through im2col and one matrix product.

    ``channels_last=False`` takes and returns NCHW arrays, ``True`` NHWC. The weight has
    the same (out_channels, in_channels, k, k) shape and the same values in both layouts,
    and both layouts build the same im2col matrix, so the two compute the same numbers.
    """

    def __init__(self, in_channels, out_channels, kernel_size, rng, padding=0,
                 channels_last=False, bias=True):
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = (rng.standard_normal((out_channels, in_channels, kernel_size, kernel_size))
                       * np.sqrt(2.0 / fan_in)).astype(DTYPE)  # He initialization for ReLU
        self.bias = np.zeros(out_channels, DTYPE) if bias else None
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias) if bias else None
        self.kernel_size = kernel_size
        self.padding = padding
        self.channels_last = channels_last

    @property
    def _spatial_axes(self):
        return (1, 2) if self.channels_last else (2, 3)

    def _im2col(self, x):
        """(N*Ho*Wo, C*k*k) matrix: one row per output pixel, its receptive field in (C, k, k) order."""
        pad = [(0, 0)] * 4
        for axis in self._spatial_axes:
            pad[axis] = (self.padding, self.padding)
        padded = np.pad(x, pad)
        k = self.kernel_size
        # sliding_window_view appends the window axes: (N, C, Ho, Wo, k, k) for NCHW and
        # (N, Ho, Wo, C, k, k) for NHWC; move them to one (N, Ho, Wo, C, k, k) order.
        windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=self._spatial_axes)
        if not self.channels_last:
            windows = windows.transpose(0, 2, 3, 1, 4, 5)
        n, ho, wo = windows.shape[:3]
        return windows.reshape(n * ho * wo, -1), (n, ho, wo)

    def __call__(self, x):
        self._x_shape = x.shape
        self._cols, (n, ho, wo) = self._im2col(x)
        y = self._cols @ self.weight.reshape(len(self.weight), -1).T
        if self.bias is not None:
            y += self.bias
        y = y.reshape(n, ho, wo, -1)  # NHWC
        return y if self.channels_last else np.ascontiguousarray(y.transpose(0, 3, 1, 2))

    def backward(self, dy):
        if not self.channels_last:
            dy = dy.transpose(0, 2, 3, 1)
        n, ho, wo, c_out = dy.shape
        dy_rows = dy.reshape(n * ho * wo, c_out)
        self.grad_weight += (dy_rows.T @ self._cols).reshape(self.weight.shape)
        if self.bias is not None:
            self.grad_bias += dy_rows.sum(axis=0)
        # col2im: scatter each window position's gradient back onto the padded input.
        dcols = (dy_rows @ self.weight.reshape(c_out, -1)).reshape(n, ho, wo, *self.weight.shape[1:])
        k, p = self.kernel_size, self.padding
        if self.channels_last:
            _, h, w, c = self._x_shape
            dx = np.zeros((n, h + 2 * p, w + 2 * p, c), DTYPE)
            for i in range(k):
                for j in range(k):
                    dx[:, i:i + ho, j:j + wo, :] += dcols[..., i, j]
            return dx[:, p:p + h, p:p + w, :]
        _, c, h, w = self._x_shape
        dx = np.zeros((n, c, h + 2 * p, w + 2 * p), DTYPE)
        for i in range(k):
            for j in range(k):
                dx[:, :, i:i + ho, j:j + wo] += dcols[..., i, j].transpose(0, 3, 1, 2)
        return dx[:, :, p:p + h, p:p + w]


# ---------------------------------------------------------------------------------------
# Layers without parameters
# ---------------------------------------------------------------------------------------
class Sigmoid:
    def __call__(self, x):
        # 0.5 * (1 + tanh(x / 2)) is the logistic function without overflow for large |x|.
        self._y = 0.5 * (1 + np.tanh(0.5 * x))
        return self._y

    def backward(self, dy):
        return dy * self._y * (1 - self._y)


class ReLU:
    def __call__(self, x):
        self._mask = x > 0
        return np.where(self._mask, x, DTYPE(0))

    def backward(self, dy):
        return np.where(self._mask, dy, DTYPE(0))


class AvgPool2d:
    """2x2 average pooling with stride 2 (even H and W), NCHW or NHWC."""

    def __init__(self, channels_last=False):
        self.channels_last = channels_last

    def __call__(self, x):
        if self.channels_last:
            n, h, w, c = x.shape
            return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))

    def backward(self, dy):
        spatial = (1, 2) if self.channels_last else (2, 3)
        return np.repeat(np.repeat(dy, 2, axis=spatial[0]), 2, axis=spatial[1]) * DTYPE(0.25)


class Flatten:
    """(N, ...) -> (N, features), always in channels-first (C, H, W) order.

    Flattening NHWC arrays in (C, H, W) order too keeps the next Linear layer's weights
    meaning the same thing in both layouts.
    """

    def __init__(self, channels_last=False):
        self.channels_last = channels_last

    def __call__(self, x):
        self._shape = x.shape
        if self.channels_last:
            x = x.transpose(0, 3, 1, 2)
        return x.reshape(len(x), -1)

    def backward(self, dy):
        if self.channels_last:
            n, h, w, c = self._shape
            return dy.reshape(n, c, h, w).transpose(0, 2, 3, 1)
        return dy.reshape(self._shape)


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------
def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels, and d(loss)/d(logits)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_probs[rows, labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1
    return float(loss), dlogits / len(labels)


# ---------------------------------------------------------------------------------------
# A network is a list of layers
# ---------------------------------------------------------------------------------------
def forward(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def backward(layers, dy):
    for layer in reversed(layers):
        dy = layer.backward(dy)
    return dy


def parameters(layer):
    """(parameter, gradient) pairs of one layer; cpubn.BatchNorm exposes them as attributes."""
    if isinstance(layer, cpubn.BatchNorm):
        if not layer.affine:
            return []
        return [(layer.weight, layer.grad_weight), (layer.bias, layer.grad_bias)]
    return layer.parameters() if hasattr(layer, "parameters") else []


def sgd_step(layers, learning_rate):
    """Plain SGD: parameter -= learning_rate * gradient (in place), then clear the gradients."""
    for layer in layers:
        for param, grad in parameters(layer):
            param -= DTYPE(learning_rate) * grad
        if hasattr(layer, "zero_grad"):
            layer.zero_grad()


def set_training(layers, mode):
    """Switch every BatchNorm between training (batch statistics) and eval (running statistics)."""
    for layer in layers:
        if isinstance(layer, cpubn.BatchNorm):
            layer.train(mode)


@contextmanager
def eval_mode(layers):
    """``with eval_mode(layers):`` runs inference on running statistics, then restores each mode."""
    batch_norms = [layer for layer in layers if isinstance(layer, cpubn.BatchNorm)]
    modes = [bn.training for bn in batch_norms]
    for bn in batch_norms:
        bn.eval()
    try:
        yield layers
    finally:
        for bn, mode in zip(batch_norms, modes):
            bn.train(mode)


@contextmanager
def single_threaded_blas():
    """Run NumPy's matrix products on one thread inside the block.

    These networks multiply 60x100 matrices: a BLAS thread team only adds synchronization,
    and on a busy machine (2 cores, another process running) a descheduled BLAS thread
    made training many times slower. threadpoolctl comes with scikit-learn; cpubn's own
    OpenMP threads are left alone (it runs small arrays on one thread by itself).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def predict(layers, x):
    """Class predictions, computed in eval mode."""
    with eval_mode(layers):
        return forward(layers, x).argmax(axis=1)

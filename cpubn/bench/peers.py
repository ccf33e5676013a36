"""The peers of ``python -m cpubn bench``: cpubn, a plain NumPy BatchNorm and PyTorch,
each a zero-argument callable over one shape's shared buffers, and the check that
cpubn's result agrees with NumPy's.

- ``copy``: a parallel copy of the input into a buffer of its own (the same-input bound).
- ``cpubn_out``: ``cpubn.batch_norm_forward`` / ``batch_norm_backward`` writing into a
  preallocated ``out=`` buffer; ``cpubn``: the same calls allocating their output.
- ``numpy``: :func:`numpy_batch_norm_forward` / :func:`numpy_batch_norm_backward`, plain
  vectorized NumPy in the input dtype, the way a user writes it (one thread).
- ``torch``: ``torch.nn.functional.batch_norm`` and
  ``torch.ops.aten.native_batch_norm_backward`` (the kernel autograd calls); for layout
  ``nhwc`` the tensor is the NHWC array permuted to NCHW (``channels_last``).
- ``torch_other`` (backward of 4-D and 5-D data only): the same backward on a copy in
  PyTorch's other memory format, so that cpubn's backward is compared with the faster of
  PyTorch's two layouts.
- ``onnxruntime`` (eval, channels-first only: ONNX's BatchNormalization takes NCHW): an
  InferenceSession of one BatchNormalization node with the case's thread count, what edge
  deployments run.
"""

from __future__ import annotations

import math

import numpy as np

from .harness import EPS, MOMENTUM, layout_axis, layout_shape, torch_view

PEERS = ("copy", "cpubn_out", "cpubn", "numpy", "torch", "torch_other", "onnxruntime")


# --------------------------------------------------------------------------
# The NumPy peer: what a user writes without cpubn.
# --------------------------------------------------------------------------

def _channel_axes(ndim, axis):
    """(normalized channel axis, the other axes: those a statistic reduces over)."""
    axis = axis % ndim
    reduce_axes = tuple(i for i in range(ndim) if i != axis)
    return axis, reduce_axes


def _per_channel(v, ndim, axis):
    """A (C,) vector (or an already broadcastable one) reshaped to broadcast along ``axis``."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(v, shape)


def numpy_batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                             training=True, momentum=MOMENTUM, eps=EPS, axis=1):
    """Straightforward vectorized NumPy BatchNorm in ``x``'s dtype.

    Returns ``(y, mean, invstd)``, the statistics shaped to broadcast against
    ``x``. In training, updates ``running_mean`` / ``running_var`` in place
    (unbiased variance for the running one), like PyTorch. This is the baseline
    a user would write, not an oracle: it accumulates in ``x``'s dtype.
    """
    axis, reduce_axes = _channel_axes(x.ndim, axis)
    if training:
        mean = x.mean(axis=reduce_axes, keepdims=True)
        var = x.var(axis=reduce_axes, keepdims=True)
        if running_mean is not None:
            m = x.size // x.shape[axis]
            running_mean *= 1 - momentum
            running_mean += momentum * mean.ravel()
            running_var *= 1 - momentum
            running_var += momentum * var.ravel() * (m / (m - 1))
    else:
        mean = _per_channel(running_mean, x.ndim, axis)
        var = _per_channel(running_var, x.ndim, axis)
    invstd = 1 / np.sqrt(var + eps)
    y = (x - mean) * invstd
    if weight is not None:
        y = y * _per_channel(weight, x.ndim, axis)
    if bias is not None:
        y = y + _per_channel(bias, x.ndim, axis)
    return y, mean, invstd


def numpy_batch_norm_backward(dy, x, mean, invstd, weight=None, axis=1):
    """Straightforward NumPy BatchNorm backward through the batch statistics.

    ``mean`` / ``invstd`` are (C,) or broadcastable (as returned by
    :func:`numpy_batch_norm_forward`). Returns ``(dx, dweight, dbias)``.
    """
    axis, reduce_axes = _channel_axes(x.ndim, axis)
    m = x.size // x.shape[axis]
    mean = _per_channel(mean, x.ndim, axis)
    invstd = _per_channel(invstd, x.ndim, axis)
    xhat = (x - mean) * invstd
    dbias = dy.sum(axis=reduce_axes)
    dweight = (dy * xhat).sum(axis=reduce_axes)
    scale = invstd if weight is None else invstd * _per_channel(weight, x.ndim, axis)
    dx = (scale / m) * (m * dy - _per_channel(dbias, x.ndim, axis)
                        - xhat * _per_channel(dweight, x.ndim, axis))
    return dx, dweight, dbias


class BenchBuffers:
    """The arrays shared by every peer for one shape: x, dy, out (flat, reshaped per layout)."""

    def __init__(self, shape, dtype, rng):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        size = math.prod(shape)
        self.x = rng.standard_normal(size, dtype=self.dtype)
        self.x *= 2
        self.x += 0.5
        self.dy = rng.standard_normal(size, dtype=self.dtype)
        self.out = np.zeros(size, dtype=self.dtype)
        # The copy baseline's own destination: copying into `out` would leave it warm in
        # the caches for the out= call that follows and flatter its copy-multiple.
        self.copy_out = np.zeros(size, dtype=self.dtype)
        c = shape[1]
        self.weight = (1 + 0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.bias = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.nbytes = self.x.nbytes

    def view(self, layout):
        s = layout_shape(self.shape, layout)
        return self.x.reshape(s), self.dy.reshape(s), self.out.reshape(s)

    def running_stats(self):
        c = self.shape[1]
        return np.zeros(c, dtype=self.dtype), np.ones(c, dtype=self.dtype)


def cpubn_peers(cpubn, buf, layout, op):
    """cpubn writing into ``buf.out`` ('cpubn_out') and allocating its output ('cpubn')."""
    x, dy, out = buf.view(layout)
    axis, w, b = layout_axis(layout), buf.weight, buf.bias
    rm, rv = buf.running_stats()
    if op == "backward":
        _, save_mean, save_invstd = cpubn.batch_norm_forward(
            x, w, b, rm, rv, training=True, momentum=MOMENTUM, eps=EPS, axis=axis)
        return {
            "cpubn_out": lambda: cpubn.batch_norm_backward(
                dy, x, save_mean, save_invstd, w, training=True, axis=axis, out=out),
            "cpubn": lambda: cpubn.batch_norm_backward(
                dy, x, save_mean, save_invstd, w, training=True, axis=axis),
        }
    training = op == "train"
    return {
        "cpubn_out": lambda: cpubn.batch_norm_forward(
            x, w, b, rm, rv, training=training, momentum=MOMENTUM, eps=EPS, axis=axis, out=out),
        "cpubn": lambda: cpubn.batch_norm_forward(
            x, w, b, rm, rv, training=training, momentum=MOMENTUM, eps=EPS, axis=axis),
    }


def _numpy_peer(buf, layout, op):
    x, dy, _ = buf.view(layout)
    axis, w, b = layout_axis(layout), buf.weight, buf.bias
    if op == "backward":
        _, mean, invstd = numpy_batch_norm_forward(x, w, b, axis=axis)
        return lambda: numpy_batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    rm, rv = buf.running_stats()
    return lambda: numpy_batch_norm_forward(
        x, w, b, rm, rv, training=op == "train", momentum=MOMENTUM, eps=EPS, axis=axis)


def _torch_peer(torch, buf, layout, op):
    x, dy, _ = buf.view(layout)
    xt, dyt = torch_view(torch, x, layout), torch_view(torch, dy, layout)
    wt, bt = torch.from_numpy(buf.weight), torch.from_numpy(buf.bias)
    rm, rv = (torch.from_numpy(v) for v in buf.running_stats())
    if op == "backward":
        _, save_mean, save_invstd = torch.native_batch_norm(xt, wt, bt, rm, rv, True, MOMENTUM, EPS)
        backward = torch.ops.aten.native_batch_norm_backward
        return lambda: backward(dyt, xt, wt, rm, rv, save_mean, save_invstd, True, EPS,
                                [True, True, True])
    batch_norm = torch.nn.functional.batch_norm
    training = op == "train"
    return lambda: batch_norm(xt, rm, rv, wt, bt, training=training, momentum=MOMENTUM, eps=EPS)


def _torch_other_peer(torch, buf, layout):
    """The backward on a copy of x and dy in the memory format the case's layout is not."""
    x, dy, _ = buf.view(layout)
    fmt = torch.contiguous_format if layout == "nhwc" else torch.channels_last
    if x.ndim == 5:
        fmt = torch.contiguous_format if layout == "nhwc" else torch.channels_last_3d
    xt = torch_view(torch, x, layout).contiguous(memory_format=fmt)
    dyt = torch_view(torch, dy, layout).contiguous(memory_format=fmt)
    wt, bt = torch.from_numpy(buf.weight), torch.from_numpy(buf.bias)
    rm, rv = (torch.from_numpy(v) for v in buf.running_stats())
    _, save_mean, save_invstd = torch.native_batch_norm(xt, wt, bt, rm, rv, True, MOMENTUM, EPS)
    backward = torch.ops.aten.native_batch_norm_backward
    return lambda: backward(dyt, xt, wt, rm, rv, save_mean, save_invstd, True, EPS,
                            [True, True, True])


def import_onnxruntime():
    """(onnxruntime, onnx) when both are installed (the ``onnx`` extra), else None."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime, onnx


def onnxruntime_session(modules, shape, dtype, weight, bias, mean, var, n_threads):
    """An onnxruntime InferenceSession running one BatchNormalization node (eval) on NCHW
    input of ``shape``, and the name of its input."""
    onnxruntime, onnx = modules
    helper, tensor = onnx.helper, onnx.TensorProto
    elem = {np.dtype(np.float32): tensor.FLOAT, np.dtype(np.float64): tensor.DOUBLE}[np.dtype(dtype)]
    c = shape[1]
    node = helper.make_node("BatchNormalization", ["x", "scale", "b", "mean", "var"], ["y"],
                            epsilon=EPS)
    initializers = [helper.make_tensor(name, elem, [c], np.asarray(v, dtype).tolist())
                    for name, v in (("scale", weight), ("b", bias), ("mean", mean), ("var", var))]
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("x", elem, list(shape))],
                              [helper.make_tensor_value_info("y", elem, list(shape))],
                              initializer=initializers)
    opset = helper.make_opsetid("", 15)
    # The oldest IR version that carries the opset, not the onnx package's newest: a
    # runtime older than the onnx package refuses a model of an IR version it predates.
    model = helper.make_model(graph, opset_imports=[opset],
                              ir_version=helper.find_min_ir_version_for([opset]))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session


def _onnxruntime_peer(modules, buf, layout, n_threads):
    x, _, _ = buf.view(layout)
    rm, rv = buf.running_stats()
    session = onnxruntime_session(modules, x.shape, buf.dtype, buf.weight, buf.bias, rm, rv,
                                  n_threads)
    feed = {"x": x}
    return lambda: session.run(None, feed)[0]


def build_peers(cpubn, torch, copy_parallel, buf, layout, op, n_threads, names=PEERS,
                ort=None):
    """(name -> zero-argument callable running ``op``, name -> error met while preparing).

    Only the peers in ``names`` are built; ``torch`` None leaves torch out, and ``ort``
    None (else import_onnxruntime()'s modules) onnxruntime. The callables close over
    ``buf``'s arrays, so every peer reads the same memory.
    """
    fns, errors = {}, {}
    if "copy" in names:
        src, dst = buf.x.view(np.uint8), buf.copy_out.view(np.uint8)
        fns["copy"] = lambda: copy_parallel(src, dst, n_threads)
    if "cpubn" in names or "cpubn_out" in names:
        try:
            fns.update(cpubn_peers(cpubn, buf, layout, op))
        except Exception as exc:  # a library bug: report it, benchmark the others
            errors["cpubn"] = errors["cpubn_out"] = f"preparing failed: {exc!r}"
    if "numpy" in names:
        fns["numpy"] = _numpy_peer(buf, layout, op)
    if torch is not None and "torch" in names:
        try:
            fns["torch"] = _torch_peer(torch, buf, layout, op)
        except Exception as exc:
            errors["torch"] = repr(exc)
    if torch is not None and "torch_other" in names and op == "backward" and len(buf.shape) in (4, 5):
        try:
            fns["torch_other"] = _torch_other_peer(torch, buf, layout)
        except Exception as exc:
            errors["torch_other"] = repr(exc)
    if ort is not None and "onnxruntime" in names and op == "eval" and layout == "nchw":
        try:
            fns["onnxruntime"] = _onnxruntime_peer(ort, buf, layout, n_threads)
        except Exception as exc:
            errors["onnxruntime"] = repr(exc)
    fns = {name: fn for name, fn in fns.items() if name in names}
    errors = {name: e for name, e in errors.items() if name in names}
    return fns, errors


def _sample_flat(a, count=200_000):
    a = np.asarray(a).reshape(-1)
    return a[:: max(1, a.size // count)]


def check_results(results, out, dtype):
    """Compare cpubn's warm-up results with NumPy's; '' when fine, else what is wrong.

    ``out`` still holds cpubn_out's result: of the peers warmed up after it, none
    writes there (the copy peer runs first).
    """
    problems = []
    ref = results.get("numpy")
    tol = 2e-3 if np.dtype(dtype) == np.float32 else 1e-9
    for name in ("cpubn_out", "cpubn"):
        if name not in results:
            continue
        y = results[name][0]
        if not isinstance(y, np.ndarray) or y.dtype != dtype:
            problems.append(f"{name} returned {type(y).__name__} of dtype {getattr(y, 'dtype', None)}")
            continue
        if name == "cpubn_out" and not np.shares_memory(y, out):
            problems.append("cpubn_out did not return the out= buffer")
        if y.shape != out.shape:
            problems.append(f"{name} returned shape {y.shape}, expected {out.shape}")
            continue
        if not y.flags.c_contiguous:
            problems.append(f"{name} output is not C-contiguous like its input")
        if ref is not None:
            a, r = _sample_flat(y), _sample_flat(ref[0])
            if not np.allclose(a, r, rtol=tol, atol=tol, equal_nan=True):
                err = float(np.max(np.abs(a.astype(np.float64) - r)))
                problems.append(f"{name} differs from NumPy (max abs diff {err:.3g})")
    return "; ".join(problems)

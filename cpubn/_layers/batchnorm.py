"""The stateful BatchNorm layer: parameters, running statistics, train/eval, gradients.

It validates, calls cpubn._core.dispatch, and only then touches its state, so a call that
raises leaves the object exactly as it was.
"""
import json
import operator
import os
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .._core import dispatch, foreign
from .._kernels.arrays import out_still_fits, params_unchanged
from .._core.layout import Layout, plan
from .._core.validation import (check_activation, check_axis, check_batch_stats_possible,
                                check_bool, check_channel_array, check_data, check_eps, check_like,
                                check_momentum, check_num_features, check_out, check_param_dtype,
                                check_residual, check_state_array, is_half, overlaps_input)
from .grad_mode import saving_for_backward

_FORMAT_VERSION = 1

_Layer = TypeVar("_Layer", bound="BatchNorm")

# The per-channel attributes the kernels read, in _kernel_params' order.
_PARAM_NAMES = ("weight", "bias", "running_mean", "running_var")

# Input plans a layer keeps (_plan): a model feeds each layer one or a few shapes.
_PLANS_PER_LAYER = 8

# (array, name) pairs for check_out's overlap tests.
_NamedArrays = tuple[tuple[object, str], ...]

# What a layer computes for its own calls and what its last forward saved for backward:
# neither is part of its state, so neither goes into a pickle (or a copy made by the copy
# module).  _track_batch appears here when precise_statistics hooks an instance.
_TRANSIENT = ("_saved", "_checked_params", "_checked_out", "_plans", "_track_batch",
              "_busy")


def _check_file_shapes(num_features: object, state: Mapping[str, NDArray[Any]]) -> None:
    """A saved layer's per-channel arrays must have num_features values each."""
    for key, value in state.items():
        if key != "num_batches_tracked" and value.shape != (num_features,):
            raise ValueError(f"state entry {key!r} has shape {value.shape}, but "
                             f"num_features is {num_features!r}")


class _EmptyBatch:
    """The record of a forward on an empty batch: what its backward checks dy against."""

    __slots__ = ("shape", "dtype", "residual")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any], residual: bool) -> None:
        self.shape, self.dtype, self.residual = shape, dtype, residual


class _NothingSaved:
    """The record of a forward that kept nothing for backward, and why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class BatchNorm:
    """Batch Normalization over the feature axis of an N-d array, with PyTorch's semantics.

    ``BatchNorm(C)`` behaves like ``torch.nn.BatchNorm1d/2d/3d(C)`` on channels-first data
    (``axis=1``); ``axis=-1`` handles channels-last data (NHWC, or (N, C) rows).

    Training mode (the default; ``train()``) normalizes with the batch mean and biased
    variance and updates ``running_mean`` / ``running_var``:
    ``running = (1 - momentum) * running + momentum * batch`` using the unbiased batch
    variance; ``momentum=None`` gives a cumulative average (a momentum outside [0, 1], which
    PyTorch accepts and extrapolates with, raises ValueError: no average has such a
    weight).  Eval mode (``eval()``) uses
    the running statistics.  With ``track_running_stats=False`` batch statistics are used
    in both modes.

    ``backward(dy)`` returns dx and adds the parameter gradients into ``grad_weight`` and
    ``grad_bias`` (``zero_grad()`` clears them).  A training-mode forward keeps a reference
    to its input for it (``clear_saved()`` drops it); an eval-mode forward only a weak one,
    so backward after it needs the input still alive; under ``cpubn.no_grad()`` a forward
    keeps nothing.  Do not modify the input in place before calling backward.  Pickling a
    layer (or copying it) keeps its state, not what it saved for backward.

    Parameters and running statistics are stored in ``dtype`` (float32 or float64: unlike
    PyTorch, not float16 or bfloat16; half-precision state dicts are widened exactly on
    load); float32, float64, float16 and bfloat16 (ml_dtypes) inputs are accepted and the
    output has the input's dtype, shape and memory order.  Half-precision inputs are computed in float32
    with the parameters read as float32 (PyTorch's "mixed type"), and rounded once.

    Fused epilogue: ``activation="relu"`` returns relu(bn(x)) and ``bn(x, residual=r)``
    returns act(bn(x) + r) (a ResNet block's tail), computed in the normalization's own
    pass.  Backward then differentiates through them, and returns ``(dx, dresidual)``
    after a forward with a residual.  With ReLU it reads the mask from the forward's
    output (y > 0), keeping a reference to it instead of a copy: do not modify the
    returned y (or ``out``) in place before calling backward.

    Attributes:
        num_features (int): C, the length of the feature axis.
        eps (float): added to the variance before its square root.
        momentum (float or None): the running statistics' update factor; None gives a
            cumulative average.
        affine (bool): whether the layer has ``weight`` and ``bias``.
        track_running_stats (bool): whether the layer keeps running statistics.
        axis (int): the feature axis of the data (1: channels-first, -1: channels-last).
        dtype (numpy.dtype): float32 or float64, the dtype of every per-channel array.
        activation (str or None): the fused activation, ``"relu"`` or None.
        training (bool): training mode (``train()``) or eval mode (``eval()``).
        weight, bias (ndarray of shape (C,), or None): the affine parameters (gamma and
            beta), updated in place by an optimizer; None when ``affine=False``.
        grad_weight, grad_bias (ndarray of shape (C,), or None): the gradients that
            ``backward`` adds to (``zero_grad()`` clears them); None when ``affine=False``.
        running_mean, running_var (ndarray of shape (C,), or None): the running statistics
            used in eval mode (variance unbiased, as in PyTorch); None when
            ``track_running_stats=False``.
        num_batches_tracked (int or None): training batches seen (the cumulative average's
            count when ``momentum=None``); None when ``track_running_stats=False``.
    """

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    axis: int
    dtype: np.dtype[Any]
    activation: str | None
    training: bool
    # The per-channel arrays are None when the layer was built without them (affine=False,
    # track_running_stats=False), a choice made at construction that the type cannot
    # follow.  Typed `NDArray | Any` (typeshed's convention for such values) rather than
    # `NDArray | None`, so that the usual code, `bn.weight -= lr * bn.grad_weight`, needs
    # no None check to type-check.
    weight: NDArray[Any] | Any
    bias: NDArray[Any] | Any
    grad_weight: NDArray[Any] | Any
    grad_bias: NDArray[Any] | Any
    running_mean: NDArray[Any] | Any
    running_var: NDArray[Any] | Any
    _batches: NDArray[np.int64] | None      # num_batches_tracked, see its property
    # The last forward's record for backward: a dispatch.Saved, or the subclass's own
    # kind (GhostSaved, SyncBatchNorm's empty slice), which only its own hooks read.
    _saved: Any
    _busy: bool                     # a forward or backward is running: see _in_use_error
    _checked_params: tuple[bool, int, np.dtype[Any] | None,
                           tuple[NDArray[Any] | None, ...]] | None
    # The last forward `out` that passed check_out: see _check_forward_out.
    _checked_out: tuple["weakref.ref[NDArray[Any]]", tuple[int, ...], tuple[int, ...],
                        np.dtype[Any], object] | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, axis: int = 1,
                 dtype: DTypeLike = np.float32, activation: str | None = None) -> None:
        self.num_features = check_num_features(num_features)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = check_axis(axis)
        self.dtype = check_param_dtype(dtype)
        self.activation = check_activation(activation)
        self.training = True
        channels = self.num_features
        if self.affine:
            self.weight = np.ones(channels, self.dtype)
            self.bias = np.zeros(channels, self.dtype)
            self.grad_weight = np.zeros(channels, self.dtype)
            self.grad_bias = np.zeros(channels, self.dtype)
        else:
            self.weight = self.bias = self.grad_weight = self.grad_bias = None
        if self.track_running_stats:
            self.running_mean = np.zeros(channels, self.dtype)
            self.running_var = np.ones(channels, self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._plans: dict[tuple[Any, ...], tuple[int, Layout]]
        self._reset_transient()

    def _reset_transient(self) -> None:
        """No saved forward and empty per-call caches (_TRANSIENT)."""
        self._saved = None
        self._checked_params = None
        self._checked_out = None
        self._plans = {}
        self._busy = False

    # ------------------------------------------------------------------ forward / backward
    def __call__(self, x: ArrayLike, out: NDArray[Any] | None = None, *,
                 residual: ArrayLike | None = None) -> NDArray[Any]:
        """``bn(x, out=None, residual=None)`` is ``bn.forward(x, out, residual=residual)``:
        normalize x (see ``forward``)."""
        return self.forward(x, out, residual=residual)

    def forward(self, x: ArrayLike, out: NDArray[Any] | None = None, *,
                residual: ArrayLike | None = None) -> NDArray[Any]:
        """Normalize x (features on ``self.axis``); returns y, or ``out`` if given.

        ``out``: an array of x's shape and dtype to write into.  It may be x itself (an
        in-place forward, e.g. to save memory at inference), but then x is gone and a
        following ``backward`` raises; it must not partially overlap x.
        ``residual``: an array of x's shape and dtype (any memory order; never modified,
        and out must not overlap it) added before the activation:
        y = act(bn(x) + residual).

        A training-mode forward or a backward while another thread's training forward or
        backward runs on the same layer raises RuntimeError (see _in_use_error); eval-mode
        forwards may share a layer between threads (inference serving)."""
        training = self.training
        if training and self._busy:
            raise self._in_use_error()
        try:
            if training:
                self._busy = True
            x, axis, layout = self._plan(x)
            if x.size == 0:
                return self._forward_empty_batch(x, out, residual)
            relu = self.activation is not None and check_activation(self.activation) is not None
            if residual is not None:
                residual = check_residual(residual, x)
            weight, bias, running_mean, running_var = self._kernel_params(x.dtype)
            in_place = False
            if out is not None:
                out, in_place = self._check_forward_out(out, x, residual)
            tracking = training and self.track_running_stats
            if tracking:                        # checked before the kernel and any state change
                check_state_array(self.running_mean, self.num_features, "running_mean")
                check_state_array(self.running_var, self.num_features, "running_var")
            batch_stats = training or not self.track_running_stats
            if batch_stats:
                y, saved = self._forward_batch_stats(x, axis, weight, bias, out, residual, relu)
            else:
                y, saved = dispatch.forward(x, axis, weight, bias, self.eps, out, running_mean,
                                             running_var, params_checked=True, residual=residual,
                                             relu=relu, layout=layout)
            if tracking:
                self._track_batch(saved, x.size // x.shape[axis])
            if not saving_for_backward():
                self._saved = _NothingSaved("it ran under cpubn.no_grad()")
                return y
            if in_place:
                saved.x_dense = None            # overwritten in place: nothing to differentiate
                saved.y_dense = None
            elif not batch_stats:
                # Inference holds nothing alive: the input (and the ReLU mask) by weak
                # references only, which a backward revives while the caller still has them.
                saved.weak = (weakref.ref(x), None if saved.y_dense is None else weakref.ref(y))
                saved.x_dense = saved.y_dense = None
            self._saved = saved
            return y
        finally:
            if training:
                self._busy = False

    # A layer trains one call at a time.  It has one saved forward and one running-
    # statistics state, and its kernels release the GIL: two threads training one layer
    # lose running-statistics updates and mix up each other's saved forward, and
    # serializing them would still give one thread's backward the other's forward, so the
    # second call raises.  Eval-mode forwards change no state but the saved record, so
    # threads serving inference may share a layer; their backward is the one thing they
    # cannot share.  Training forwards and backward check the layer's _busy flag and set
    # it as the first statement of their try block: no other thread and no signal handler
    # runs between the check and the mark (no call between them), and an interrupt after
    # the mark finds the finally clause that clears it.  A lock would not do: an
    # interrupt between its acquire and the try block keeps it held.
    def _in_use_error(self) -> RuntimeError:
        return RuntimeError(f"this {type(self).__name__} is running a call in another "
                            f"thread: a layer holds one saved forward and one set of running "
                            f"statistics, so give each thread its own layer (copy.deepcopy)")

    def _forward_empty_batch(self, x: NDArray[Any], out: NDArray[Any] | None,
                             residual: ArrayLike | None) -> NDArray[Any]:
        """An empty batch, as PyTorch takes one: an empty output, every argument checked as
        for any call; in training the batch is counted (num_batches_tracked) but moves no
        statistic; its backward gives an empty dx and adds nothing to the gradients."""
        check_activation(self.activation)
        residual_array = None if residual is None else check_residual(residual, x)
        self._kernel_params(x.dtype)
        checked = check_out(out, x, may_alias=((x, "the input"),),
                            must_not_overlap=self._per_channel_arrays())
        y = np.empty_like(x) if checked is None else checked
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1   # type: ignore[operator]  # tracking: an int
        self._saved = (_EmptyBatch(x.shape, x.dtype, residual_array is not None)
                       if saving_for_backward()
                       else _NothingSaved("it ran under cpubn.no_grad()"))
        return y

    def clear_saved(self) -> None:
        """Drop what the last forward kept for backward (its input, and with ReLU its
        output, in training mode), so that memory can go; a backward then raises
        ValueError until the next forward.  Eval-mode forwards keep only weak references,
        and forwards under ``cpubn.no_grad()`` keep nothing."""
        if self._saved is not None:
            self._saved = _NothingSaved("clear_saved() dropped it")

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """The layer without its per-call caches and without what its last forward saved
        for backward: an unpickled (or copied) layer computes the same bits, and its
        backward needs a forward of its own first."""
        state = self.__dict__.copy()
        for name in _TRANSIENT:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_transient()

    def _plan(self, x: object) -> tuple[NDArray[Any], int, Layout]:
        """x validated as this layer's input (check_data), its feature axis and its Layout.

        For an ndarray the outcome is kept per (shape, strides, dtype, axis,
        num_features), every fact check_data and the layout are derived from, so a
        repeated call costs a dict lookup.  Other inputs (lists, subclasses, non-native
        byte order) are validated on every call."""
        key = None
        if type(x) is np.ndarray:
            key = (x.shape, x.strides, x.dtype, self.axis, self.num_features)
            known = self._plans.get(key)
            if known is not None:
                return x, known[0], known[1]
        array, axis = check_data(x, self.axis, self.num_features)
        layout = plan(array, axis)
        if key is not None and array is x:
            if len(self._plans) >= _PLANS_PER_LAYER:
                self._plans.clear()
            self._plans[key] = (axis, layout)
        return array, axis, layout

    def _check_forward_out(self, out: object, x: NDArray[Any],
                           residual: NDArray[Any] | None) -> tuple[NDArray[Any], bool]:
        """check_out for a forward's `out` (x may be it, nothing else may overlap it), and
        whether it is x's memory (an in-place call).  Runs after _kernel_params.

        Calls that pass the same `out` again (a loop writing into one buffer) skip the
        checks whose facts have not changed, since at batch 1 they cost as much as
        allocating: the last `out` that passed is kept (weakly) with its shape, strides and
        dtype, and the per-channel arrays it was checked against are those of
        _checked_params (the same objects, length, dtype and C-contiguity, confirmed by
        _kernel_params on this call).  Same object, shape, strides and dtype fix an array's
        memory extent (its data only moves under ndarray.resize(refcheck=False), which
        NumPy documents as unsafe), so its self-overlap and its overlap with those arrays
        are as checked.  Checked again on every call: out's shape and dtype against x's,
        the writeable flag, and, with a bounds test in C, overlap with x and with
        grad_weight / grad_bias (identity alone does not fix their extents: no contiguity
        check covers them).  Any doubt, a residual or a bounds hit, runs check_out."""
        cached = self._checked_out
        if (residual is None and cached is not None and cached[0]() is out
                and type(out) is np.ndarray and cached[4] is self._checked_params
                and out_still_fits(out, x, cached[1], cached[2], cached[3], self.grad_weight,
                                   self.grad_bias)):
            return out, False
        checked = check_out(out, x, may_alias=((x, "the input"),),
                            must_not_overlap=self._per_channel_arrays()
                            + (() if residual is None else ((residual, "the residual"),)))
        assert checked is not None                  # out is not None
        params = self._checked_params
        self._checked_out = None
        if type(checked) is np.ndarray and params is not None:
            self._checked_out = (weakref.ref(checked), checked.shape, checked.strides,
                                 checked.dtype, params)
        return checked, overlaps_input(checked, x)

    # Hooks for the layers built on BatchNorm (SyncBatchNorm, BatchRenorm, GhostBatchNorm):
    # they change how batch statistics are computed, tracked and differentiated, and
    # inherit validation, eval mode, state and everything else.
    def _forward_batch_stats(self, x: NDArray[Any], axis: int, weight: NDArray[Any] | None,
                             bias: NDArray[Any] | None, out: NDArray[Any] | None,
                             residual: NDArray[Any] | None,
                             relu: bool) -> tuple[NDArray[Any], Any]:
        """Normalize validated x with batch statistics; returns (y, Saved).  The
        per-channel arrays are the kernel-ready ones from _kernel_params."""
        check_batch_stats_possible(x, axis)
        return dispatch.forward(x, axis, weight, bias, self.eps, out, params_checked=True,
                                 residual=residual, relu=relu)

    def _track_batch(self, saved: Any, count: int) -> None:
        """After a training forward: count the batch and fold its statistics (saved.mean,
        saved.batch_var over `count` values per channel) into the running statistics."""
        tracked = self.num_batches_tracked + 1     # type: ignore[operator]  # only when tracking
        factor = 1.0 / tracked if self.momentum is None else self.momentum
        dispatch.update_running_stats(self.running_mean, self.running_var, saved.mean,
                                       saved.batch_var, factor, self._batches, count=count)

    # num_batches_tracked lives in an int64 array that the running-statistics kernel
    # increments in the same call that updates the statistics: a KeyboardInterrupt from a
    # signal handler then finds both updated or neither, never one without the other.
    @property
    def num_batches_tracked(self) -> int | None:
        """Training batches seen (the cumulative average's count when momentum=None);
        None when track_running_stats=False."""
        return None if self._batches is None else int(self._batches[0])

    @num_batches_tracked.setter
    def num_batches_tracked(self, value: int | None) -> None:
        self._batches = None if value is None else np.array([operator.index(value)], np.int64)

    def _backward_kernel(self, dy: NDArray[Any], saved: Any, weight: NDArray[Any] | None,
                         out: NDArray[Any] | None) -> dispatch.BackwardResult:
        """(dx, grads, dresidual) for validated dy: see dispatch.backward."""
        return dispatch.backward(dy, saved, weight, out)

    def _kernel_params(self, x_dtype: np.dtype[Any]
                       ) -> list[NDArray[Any] | None] | tuple[NDArray[Any] | None, ...]:
        """(weight, bias, running_mean, running_var) in the form the kernels need for data
        of dtype x_dtype (half-precision data reads them as float32).

        The check is cached while the attributes are the same array objects and the
        kernels want them in the same dtype (in-place updates such as SGD steps keep it
        valid); assigning new arrays re-checks them, and arrays that needed converting are
        re-converted on every call, so updates to the user's arrays are never missed."""
        current = (self.weight, self.bias, self.running_mean, self.running_var)
        half = is_half(x_dtype)         # the only data property the parameter dtype depends on
        cached = self._checked_params
        # Same objects, and still the length, dtype and memory layout the kernels read:
        # arrays can be resized or given another dtype in place (checked in C).
        if (cached is not None and cached[0] is half
                and params_unchanged(current, cached[3], cached[1], cached[2])):
            return current
        validated = [check_channel_array(a, self.num_features, name)
                     for a, name in zip(current, _PARAM_NAMES)]
        checked = dispatch.kernel_params(x_dtype, *validated)
        if all(a is b for a, b in zip(checked, current)):
            dtype = next((a.dtype for a in checked if a is not None), None)
            self._checked_params = (half, self.num_features, dtype, current)
        else:
            self._checked_params = None
        return checked

    def _check_writable(self, *names: str) -> None:
        """Before writing several attributes in place: all of them must take the write,
        so that a failure leaves every one as it was."""
        for name in names:
            check_state_array(getattr(self, name), self.num_features, name)

    def _per_channel_arrays(self) -> _NamedArrays:
        """(array, name) pairs of the per-channel attributes an `out` must not overlap
        (check_out skips those that are None or not arrays)."""
        return ((self.weight, "weight"), (self.bias, "bias"),
                (self.running_mean, "running_mean"), (self.running_var, "running_var"),
                (self.grad_weight, "grad_weight"), (self.grad_bias, "grad_bias"))

    # The result is dx, or (dx, dresidual) after a forward with a residual: which one
    # depends on the layer's state, not on the arguments.  Following typeshed's convention
    # for such returns, it is typed `NDArray | Any` so that the common case needs no cast.
    def backward(self, dy: ArrayLike, out: NDArray[Any] | None = None) -> NDArray[Any] | Any:
        """Gradient of the last forward: returns dx, or ``(dx, dresidual)`` when that
        forward had a residual, and accumulates grad_weight/grad_bias.

        After a training-mode forward the gradient flows through the batch statistics;
        after an eval-mode forward they are constants.  With ``activation="relu"`` the
        gradient flows where the forward's output is > 0 (dy is the gradient of the
        activation's output).  ``out``: array for dx (dy's shape and dtype); it may be dy
        itself but must not overlap the saved input or the saved output."""
        if self._busy:
            raise self._in_use_error()
        try:
            self._busy = True
            return self._backward(dy, out)
        finally:
            self._busy = False

    def _backward(self, dy: ArrayLike, out: NDArray[Any] | None) -> NDArray[Any] | Any:
        saved = self._saved
        if saved is None:
            raise ValueError("backward() called before any forward(): nothing to "
                             "differentiate")
        if isinstance(saved, _NothingSaved):
            raise ValueError(f"backward(): the last forward kept nothing to differentiate "
                             f"({saved.reason})")
        if getattr(saved, "weak", None) is not None:           # an eval-mode forward's
            saved = saved.strong()
            if saved is None:
                what = "input" if self._saved.weak[1] is None else "input and output"
                raise ValueError(f"backward() after an eval-mode forward whose {what} no "
                                 f"longer exist: an eval-mode forward keeps only weak "
                                 f"references to them, so hold them until backward")
        if isinstance(saved, _EmptyBatch):
            grad_y = check_like(dy, saved.shape, saved.dtype, "dy", "the last input")
            checked = check_out(out, grad_y, may_alias=((grad_y, "dy"),),
                                must_not_overlap=self._per_channel_arrays())
            dx = np.empty_like(grad_y) if checked is None else checked
            return (dx, np.empty_like(grad_y)) if saved.residual else dx
        if saved.x_dense is None:
            raise ValueError("backward() after an in-place forward (out=x): the input it "
                             "needs was overwritten; use a separate out array")
        dy = check_like(dy, saved.layout.shape, saved.x_dense.dtype, "dy", "the last input")
        out = check_out(out, dy, may_alias=((dy, "dy"),),
                        must_not_overlap=((saved.x_dense, "the saved input"),)
                        + (() if saved.y_dense is None
                           else ((saved.y_dense, "the last output (the ReLU mask)"),))
                        + self._per_channel_arrays())
        if self.affine:                     # checked before the kernel and any state change
            check_state_array(self.grad_weight, self.num_features, "grad_weight")
            check_state_array(self.grad_bias, self.num_features, "grad_bias")
        weight = self._kernel_params(dy.dtype)[0]
        dx, grads, dresidual = self._backward_kernel(dy, saved, weight, out)
        if self.affine:
            channels = self.num_features
            self.grad_weight += grads[:channels]
            self.grad_bias += grads[channels:]
        return dx if dresidual is None else (dx, dresidual)

    def parameters(self) -> list[tuple[NDArray[Any], NDArray[Any]]]:
        """[(weight, grad_weight), (bias, grad_bias)] for an optimizer loop; empty when
        affine=False.  Update the parameters in place: ``p -= lr * g``."""
        if not self.affine:
            return []
        return [(self.weight, self.grad_weight), (self.bias, self.grad_bias)]

    def zero_grad(self) -> None:
        """Set grad_weight and grad_bias to zero."""
        if self.affine:
            self._check_writable("grad_weight", "grad_bias")
            self.grad_weight[...] = 0
            self.grad_bias[...] = 0

    # ------------------------------------------------------------------ modes and resets
    def train(self: _Layer, mode: bool = True) -> _Layer:
        """Training mode (batch statistics, running-stat updates); returns self."""
        self.training = check_bool(mode, "mode")
        return self

    def eval(self: _Layer) -> _Layer:
        """Eval mode (running statistics); returns self."""
        return self.train(False)

    def reset_running_stats(self) -> None:
        """Running mean to 0, running variance to 1, num_batches_tracked to 0."""
        if self.track_running_stats:
            self._check_writable("running_mean", "running_var")
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Running statistics to 0 / 1, weight to 1, bias to 0 (as in PyTorch)."""
        if self.affine:
            self._check_writable("weight", "bias")
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the state under PyTorch's key names (absent keys: features off)."""
        state: dict[str, NDArray[Any]] = {}
        if self.affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None:
        """Load a state dict (ours, or a torch BatchNorm's converted with .numpy()).

        Every key this layer has is required and no other key is accepted, except
        num_batches_tracked, which PyTorch checkpoints older than 0.4.1 lack: it is then 0,
        as PyTorch fills it in.  Values are checked (shape (num_features,), float dtype,
        within the layer's dtype; running_var not negative; an integer num_batches_tracked
        from 0 to 2**63 - 1) before anything is copied, so a failed load changes nothing.
        A NaN is accepted: training on data with a NaN gives one.

        Raises TypeError for something other than a mapping {name: array} and for
        non-float or non-integer values, ValueError for missing or unexpected keys and
        values out of range."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict takes a mapping {{name: array}} (a state_dict(), "
                            f"or dict(pairs)), got {type(state_dict).__name__}")
        expected = set(self._state_keys())
        given = set(state_dict)
        if "num_batches_tracked" in expected and "num_batches_tracked" not in given:
            state_dict = dict(state_dict, num_batches_tracked=np.int64(0))
            given.add("num_batches_tracked")
        missing, unexpected = expected - given, given - expected
        if missing or unexpected:
            raise ValueError(f"state dict mismatch: missing keys {sorted(missing)}, "
                             f"unexpected keys {sorted(unexpected)}")
        arrays: dict[str, NDArray[Any]] = {}
        for key in expected - {"num_batches_tracked"}:
            value = np.asarray(state_dict[key])
            if value.dtype.kind != "f":
                raise TypeError(f"state dict entry {key!r} must be a float array, "
                                f"got dtype {value.dtype}")
            if value.shape != (self.num_features,):
                raise ValueError(f"state dict entry {key!r} has shape {value.shape}, "
                                 f"expected ({self.num_features},)")
            with np.errstate(over="ignore"):
                overflows = np.isinf(value.astype(self.dtype)) & ~np.isinf(value)
            if overflows.any():
                raise ValueError(f"state dict entry {key!r} holds values beyond the range of "
                                 f"the layer's dtype {self.dtype} (max {abs(value).max():g})")
            if key == "running_var" and (value < 0).any():
                raise ValueError(f"state dict entry 'running_var' holds negative values "
                                 f"(min {value.min():g}): no training gives a negative "
                                 f"variance")
            arrays[key] = value
        if "num_batches_tracked" in expected:
            count = np.asarray(state_dict["num_batches_tracked"])
            if count.shape != () or count.dtype.kind not in "iu":
                raise TypeError(f"state dict entry 'num_batches_tracked' must be an integer "
                                f"scalar, got {count.dtype} array of shape {count.shape}")
            if count < 0 or count > np.iinfo(np.int64).max:
                raise ValueError(f"num_batches_tracked must be from 0 to 2**63 - 1, got "
                                 f"{int(count)}")
        self._check_writable(*arrays)
        for key, value in arrays.items():
            getattr(self, key)[...] = value
        if "num_batches_tracked" in expected:
            self.num_batches_tracked = int(count)

    def _state_keys(self) -> list[str]:
        keys: list[str] = []
        if self.affine:
            keys += ["weight", "bias"]
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def _config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "eps": self.eps,
                "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats, "axis": self.axis,
                "dtype": self.dtype.name, "activation": self.activation}

    # save() writes the class name; load() of a class accepts these (a LazyBatchNorm file
    # holds a materialized layer).  A subclass with its own hyperparameters loads its own.
    _loadable_layers: ClassVar[tuple[str, ...]] = ("BatchNorm", "LazyBatchNorm")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write hyperparameters, mode and state to an .npz file (numpy adds the suffix
        if path lacks it).  ``BatchNorm.load(path)`` reads it back, with or without the
        suffix."""
        config = dict(self._config(), training=self.training, format=_FORMAT_VERSION,
                      layer=type(self).__name__)
        # (numpy's stub types **kwds as its allow_pickle flag: the arrays are by name)
        np.savez(path, config=np.array(json.dumps(config)),
                 **self.state_dict())  # type: ignore[arg-type]

    @classmethod
    def load(cls: type[_Layer], path: str | os.PathLike[str]) -> _Layer:
        """A new layer from a file written by ``save`` (``path`` with or without the
        ``.npz`` suffix ``save`` added).

        Raises FileNotFoundError if there is no such file, and ValueError naming the file
        and the problem for anything else that is not a complete, valid file of this
        layer (truncated, foreign, corrupt, bad hyperparameters or state); no partly
        loaded layer is ever returned."""
        path = os.fspath(path)
        if not os.path.exists(path) and os.path.exists(path + ".npz"):
            path += ".npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                config = json.loads(str(data["config"][()]))
                state = {key: np.array(data[key]) for key in data.files if key != "config"}
        except FileNotFoundError:
            raise
        except Exception as exc:   # BadZipFile, KeyError, JSONDecodeError, EOFError, ...
            raise ValueError(f"{path}: not a readable cpubn layer file "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(config, dict) or config.pop("format", None) != _FORMAT_VERSION:
            raise ValueError(f"{path}: not a cpubn layer file of format {_FORMAT_VERSION}")
        layer_name = config.pop("layer", "BatchNorm")
        accepted = cls.__dict__.get("_loadable_layers", (cls.__name__,))
        if layer_name not in accepted:
            raise ValueError(f"{path}: holds a {layer_name!r}, not a {cls.__name__}; load it "
                             f"with cpubn.{layer_name}.load")
        training = config.pop("training", None)
        try:
            training = check_bool(training, "training")
            # Before the constructor allocates num_features values per array: a crafted
            # file's num_features must not allocate more than its own arrays hold.
            _check_file_shapes(config.get("num_features"), state)
            layer = cls(**config)
            layer.load_state_dict(state)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid {cls.__name__} file: {exc}") from None
        return layer.train(training)

    @classmethod
    def from_torch(cls: type[_Layer], module: Any, axis: int = 1, dtype: DTypeLike | None = None,
                   activation: str | None = None, **kwargs: Any) -> _Layer:
        """A new layer equal to a torch BatchNorm module.

        module: ``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` or a materialized
            ``LazyBatchNorm*d``.  Copied: num_features, eps, momentum (PyTorch's convention,
            also cpubn's; None stays None), affine, track_running_stats, weight, bias,
            running_mean, running_var, num_batches_tracked, and ``module.training``.
        axis: the feature axis of the data the layer will see: 1 as in PyTorch, -1 for
            channels-last arrays (NHWC, or a ``channels_last`` model's data as NumPy sees it).
        dtype: the layer's parameter dtype; by default float64 for a float64 module and
            float32 otherwise (float16/bfloat16 parameters are widened exactly).
        activation, kwargs: passed on to the constructor (e.g. ``activation="relu"`` to fuse
            the ReLU that follows the BatchNorm in the model).

        The arrays are copies: later changes to the module do not reach the layer."""
        read = foreign.torch_layer_args(module, axis, dtype)
        layer = cls(read.num_features, **read.config, activation=activation, **kwargs)
        layer.load_state_dict(read.state)
        return layer.train(read.training)

    @classmethod
    def from_onnx(cls: type[_Layer], model: Any, node_name: str | None = None, axis: int = 1,
                  dtype: DTypeLike | None = None, values: Mapping[str, ArrayLike] | None = None,
                  activation: str | None = None, **kwargs: Any) -> _Layer:
        """A new layer from a BatchNormalization node of an ONNX model.

        model: an ``onnx.ModelProto`` or the path of a ``.onnx`` file.
        node_name: the node's name; may be omitted when the model has exactly one.
        axis: the feature axis of the layer's data (ONNX's BatchNormalization normalizes
            axis 1; -1 if you feed the layer channels-last arrays).
        dtype: as in ``from_torch`` (float64 for float64 initializers, else float32).
        values: ``{input name: array}`` for the node's scale, B, mean and var when they are
            graph inputs rather than initializers.
        activation, kwargs: passed on to the constructor.

        epsilon is copied; ONNX's momentum (the running statistics' weight, 0.9 by default)
        becomes cpubn's ``1 - momentum``.  ``training_mode=1`` gives a layer in training
        mode, otherwise it is in eval mode.  num_batches_tracked, which ONNX does not store,
        is 0.  Note that ONNX's training mode updates running_var with the biased batch
        variance; cpubn, like PyTorch, uses the unbiased one."""
        read = foreign.onnx_layer_args(model, node_name, axis, dtype, values)
        layer = cls(read.num_features, **read.config, activation=activation, **kwargs)
        layer.load_state_dict(read.state)
        return layer.train(read.training)

    def __repr__(self) -> str:
        activation = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}{activation})")


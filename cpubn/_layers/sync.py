"""SyncBatchNorm: one BatchNorm over the batch slices of every process of an MPI communicator.

Each training step is exactly a single-process BatchNorm on the concatenated global batch.
The forward computes each process's per-channel (count, mean, biased variance) with the
statistics-only kernel (the training kernel's statistics, bit for bit), exchanges them in
one ``Allgather`` and merges them with Chan's formula in rank order (so every process
computes bitwise the same global statistics), then normalizes with the eval kernel given
the global float64 mean and variance.  The backward
computes the local sums (Σ g, Σ g·x̂) with respect to those statistics (the eval-backward
kernel, which also writes g·w·invstd), exchanges them in one ``Allgather``, and adds the
statistics' part of dx, an affine function of x per channel, with the eval forward kernel.

Every collective carries a small header (status, phase, layer id, data dtype, ndim, feature
axis, count) so that mismatched calls raise on every process instead of hanging or
mixing garbage; the constructor runs one more exchange that compares the layers'
configurations.  mpi4py is imported only when a SyncBatchNorm is built.
"""
import os
import threading
from typing import Any, ClassVar, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .._core import dispatch
from .._core.layout import Layout
from .batchnorm import BatchNorm
from .._core.validation import (as_float_array, check_activation, check_like, check_out,
                                check_residual, is_half, normalize_axis)

INSTALL_HINT = ('cpubn.SyncBatchNorm needs mpi4py and an MPI library: pip install "cpubn[mpi]" '
                '(mpi4py and the mpich wheel), or "pip install mpi4py" built against the '
                "system's MPI")

# Header of every exchanged row (float64; small integers are exact).
_STATUS, _PHASE, _LAYER, _DTYPE, _NDIM, _AXIS, _COUNT = range(7)
_HEADER = 7
_OK, _FAILED = 0.0, 1.0
_CONSTRUCT, _FORWARD, _BACKWARD = 1.0, 2.0, 3.0
_PHASE_NAMES = {_CONSTRUCT: "construction", _FORWARD: "forward", _BACKWARD: "backward"}
_DTYPE_CODES = {"float32": 1.0, "float64": 2.0, "float16": 3.0, "bfloat16": 4.0}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}
_dtype_codes: dict[Any, float] = {}  # dtype -> code: dtype.name costs microseconds per call


def _dtype_code(dtype: DTypeLike) -> float:
    code = _dtype_codes.get(dtype)
    if code is None:
        code = _dtype_codes[dtype] = _DTYPE_CODES[np.dtype(dtype).name]
    return code

# The configuration compared at construction, in the order of _config_row.
_CONFIG_FIELDS = ("num_features", "dtype", "axis", "eps", "momentum", "affine",
                  "track_running_stats", "activation")


# mpi4py is optional: its module and communicators are typed Any (pyproject's mypy
# configuration does not follow the import, whether or not it is installed).
def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return MPI


_layer_keyval: Any = None


def _next_layer_id(comm: Any) -> int:
    """A per-communicator sequence number for each SyncBatchNorm built on it (an MPI
    attribute of the communicator, so duplicates and splits count on their own).  Every
    process builds the same layers in the same order, so a layer has the same id
    everywhere and the exchanges can check that the processes call the same layer."""
    global _layer_keyval
    if _layer_keyval is None:
        _layer_keyval = type(comm).Create_keyval()
    count: int = comm.Get_attr(_layer_keyval) or 0
    comm.Set_attr(_layer_keyval, count + 1)
    return count + 1


def allgather_rows(comm: Any, row: NDArray[np.float64]) -> NDArray[np.float64]:
    """Every process's row (float64, same length everywhere) as a (size, len) table."""
    table = np.empty((comm.Get_size(), row.size))
    comm.Allgather(row, table)
    return table


_workspace = threading.local()
# The communicator SyncBatchNorm.load passes to the constructor (BatchNorm.load builds the
# layer from the file's configuration alone).
_load_comm = threading.local()


def _backward_workspace(layout: Layout, dtype: np.dtype[Any]) -> NDArray[Any]:
    """A reusable dense array for the backward's partial dx: one per input shape and dtype
    and thread, kept between calls (a fresh large array costs page faults on every step)."""
    arrays: dict[tuple[tuple[int, ...], str], NDArray[Any]] | None = getattr(
        _workspace, "arrays", None)
    if arrays is None:
        arrays = _workspace.arrays = {}
    key = (layout.dense_shape, np.dtype(dtype).str)
    array = arrays.get(key)
    if array is None:
        if len(arrays) >= 16:
            arrays.clear()
        array = arrays[key] = layout.new_dense(dtype)
    return array


class _EmptySlice:
    """What a forward on a process's empty slice leaves for backward (and for
    _track_batch: the global statistics)."""

    __slots__ = ("shape", "dtype", "residual", "mean", "batch_var", "x_dense")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any], residual: bool,
                 mean: NDArray[np.float64] | None = None,
                 batch_var: NDArray[np.float64] | None = None) -> None:
        self.shape, self.dtype, self.residual = shape, dtype, residual
        self.mean, self.batch_var = mean, batch_var
        self.x_dense: tuple[()] = ()        # not None: backward is possible


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch: the
    concatenation of every process's input, over an MPI communicator (mpi4py).

    ``SyncBatchNorm(C, ..., comm=None)`` takes BatchNorm's arguments and an mpi4py
    intra-communicator (default ``MPI.COMM_WORLD``; a sub-communicator from
    ``comm.Split(...)`` synchronizes within its group only).  Needs ``pip install
    "cpubn[mpi]"``.

    In training mode each process gets its slice of the y, and of the dx, that one
    BatchNorm would compute on the global batch; the running statistics are updated with
    the global mean and unbiased variance and are bitwise identical on every process.
    ``grad_weight`` / ``grad_bias`` receive this process's contribution: their sum over the
    processes is the single-process gradient (reduce them like any other parameter
    gradient).  Processes may hold different batch sizes, including zero samples: an
    empty slice still takes part and gets an empty y.  Eval mode communicates nothing.

    Collective calls: the constructor (it checks that every process builds the same
    layer), each training forward and each backward after one.  Every process must call
    them in the same order and in the same mode; mismatched configurations, layers,
    dtypes or feature axes raise on every process, and so does an error in the input of
    any one process (that process raises its own error, the others a RuntimeError).

    The backward writes a partial dx into a scratch array that is kept for the next call
    (one per input shape and dtype, per thread): memory of one more input-sized array.
    Half-precision data is differentiated in float32 and rounded once.
    """

    comm: Any
    _sync_saved: Any
    _sync_count: int
    _sync_axis: int | None
    _exchanged: bool

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, axis: int = 1,
                 dtype: DTypeLike = np.float32, activation: str | None = None,
                 comm: Any = None) -> None:
        MPI = _mpi()
        if comm is None:
            comm = getattr(_load_comm, "comm", None) or MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intra-communicator (such as "
                            f"MPI.COMM_WORLD), got {type(comm).__name__}")
        self.comm = comm
        self._layer_id = _next_layer_id(comm)
        try:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, axis,
                             dtype, activation)
        except Exception:
            self._gather(self._header_row(_CONSTRUCT, _FAILED, len(_CONFIG_FIELDS)))
            raise
        self._check_config(self._gather(self._config_row()))
        self._sync_saved = None             # the Saved of the last synchronized forward
        self._sync_count = 0                # its global number of values per channel
        self._sync_axis = None

    # ------------------------------------------------------------------ exchanges
    def _header_row(self, phase: float, status: float, payload: int,
                    dtype: DTypeLike | None = None, ndim: int = 0, axis: int = 0,
                    count: int = 0) -> NDArray[np.float64]:
        row = np.zeros(_HEADER + payload)
        row[:_HEADER] = (status, phase, self._layer_id,
                         0.0 if dtype is None else _dtype_code(dtype),
                         ndim, axis, count)
        return row

    def _config_row(self) -> NDArray[np.float64]:
        row = self._header_row(_CONSTRUCT, _OK, len(_CONFIG_FIELDS))
        row[_HEADER:] = (self.num_features, self.dtype.itemsize, self.axis, self.eps,
                         -1.0 if self.momentum is None else self.momentum, self.affine,
                         self.track_running_stats, self.activation is not None)
        return row

    def _gather(self, row: NDArray[np.float64]) -> NDArray[np.float64]:
        """One Allgather of `row`; a process whose own call failed gets its table back and
        re-raises its own error, every other process raises here."""
        table = allgather_rows(self.comm, row)
        if row[_STATUS] == _OK:
            self._check_headers(table)
        return table

    def _check_headers(self, table: NDArray[np.float64]) -> None:
        headers = table[:, :_HEADER]
        if not (headers[:, _STATUS:_COUNT] != headers[0, _STATUS:_COUNT]).any() and \
                headers[0, _STATUS] == _OK:
            return                          # the common case, in one comparison
        phase = _PHASE_NAMES.get(headers[self.comm.Get_rank(), _PHASE], "?")
        failed = np.flatnonzero(headers[:, _STATUS] != _OK)
        if failed.size:
            raise RuntimeError(
                f"SyncBatchNorm {phase}: the call failed on process(es) {failed.tolist()} of "
                f"the communicator (see their error); this process's call was abandoned")
        calls = {(h[_PHASE], h[_LAYER]) for h in headers}
        if len(calls) > 1:
            where = "; ".join(f"process {r}: {_PHASE_NAMES.get(h[_PHASE], '?')} of layer "
                              f"#{int(h[_LAYER])}" for r, h in enumerate(headers))
            raise RuntimeError(f"SyncBatchNorm: the processes are not in the same call ({where})."
                               f" Every process must build and call the same SyncBatchNorm "
                               f"layers in the same order and mode")
        for column, what in ((_DTYPE, "dtype"), (_NDIM, "ndim"), (_AXIS, "feature axis")):
            if len(set(headers[:, column])) > 1:
                values = [_DTYPE_NAMES.get(v, "?") if column == _DTYPE else int(v)
                          for v in headers[:, column]]
                raise ValueError(f"SyncBatchNorm {phase}: the input's {what} differs across "
                                 f"processes: {values} (by rank); the global batch must have "
                                 f"one dtype and layout")

    def _check_config(self, table: NDArray[np.float64]) -> None:
        values = table[:, _HEADER:]
        for j, name in enumerate(_CONFIG_FIELDS):
            column = values[:, j]
            if not np.array_equal(column, np.full_like(column, column[0]), equal_nan=True):
                shown: list[object]
                if name == "dtype":
                    shown = [np.dtype(f"f{int(v)}").name for v in column]
                elif name == "activation":
                    shown = ["relu" if v else None for v in column]
                elif name in ("affine", "track_running_stats"):
                    shown = [bool(v) for v in column]
                elif name in ("num_features", "axis"):
                    shown = [int(v) for v in column]
                else:
                    shown = [None if (name == "momentum" and v == -1) else float(v)
                             for v in column]
                raise ValueError(f"SyncBatchNorm: {name} differs across the processes of the "
                                 f"communicator: {shown} (by rank)")

    def _abandon(self, phase: float) -> None:
        """This process's call failed before its exchange: take part in it anyway, marked
        failed, so the others raise instead of waiting forever."""
        self._gather(self._header_row(phase, _FAILED, 2 * self.num_features))

    # ------------------------------------------------------------------ forward
    def forward(self, x: ArrayLike, out: NDArray[Any] | None = None, *,
                residual: ArrayLike | None = None) -> NDArray[Any]:
        """BatchNorm.forward, with the global batch's statistics in training mode (one
        exchange over comm; every process must call it).  x may have zero samples."""
        if not self.training:                       # eval: no communication
            data = as_float_array(x)
            if data.size == 0:
                return self._forward_empty(data, out, residual, synchronize=False)
            return super().forward(data, out, residual=residual)
        self._exchanged = False
        try:
            data = as_float_array(x)
            if data.size == 0:
                return self._forward_empty(data, out, residual, synchronize=True)
            y = super().forward(data, out, residual=residual)
        except Exception:
            if not self._exchanged:
                self._abandon(_FORWARD)
            raise
        if self._saved is not self._sync_saved:     # kept nothing (no_grad): nor does this
            self._sync_saved = None
        return y

    def clear_saved(self) -> None:
        super().clear_saved()
        self._sync_saved = None

    clear_saved.__doc__ = BatchNorm.clear_saved.__doc__

    def __getstate__(self) -> dict[str, Any]:
        """Refused: a SyncBatchNorm belongs to its communicator's processes, which build it
        together; its state travels as ``state_dict()`` or ``save()`` instead."""
        raise TypeError("a SyncBatchNorm cannot be pickled or copied: it is built "
                        "collectively over its communicator; pickle its state_dict() (or "
                        "save() it) and build the layer on every process")

    def _exchange_statistics(self, x: NDArray[Any], axis: int, count: int,
                             mean: NDArray[np.float64] | None, var: NDArray[np.float64] | None
                             ) -> tuple[int, NDArray[np.float64], NDArray[np.float64]]:
        """Global (count, mean, biased variance) from every process's, merged in rank
        order with Chan's formula: the same bits on every process."""
        channels = self.num_features
        row = self._header_row(_FORWARD, _OK, 2 * channels, x.dtype, x.ndim, axis, count)
        if count:
            row[_HEADER:_HEADER + channels] = mean
            row[_HEADER + channels:] = var
        self._exchanged = True
        table = self._gather(row)
        total, contributors = 0.0, 0
        merged_mean: NDArray[np.float64] | None = None
        m2: NDArray[np.float64] | None = None
        single_var: NDArray[np.float64] | None = None
        for rank_row in table:
            n = rank_row[_COUNT]
            if n == 0:
                continue
            rank_mean = rank_row[_HEADER:_HEADER + channels]
            rank_var = rank_row[_HEADER + channels:]
            contributors += 1
            if merged_mean is None or m2 is None:
                total, merged_mean, m2, single_var = n, rank_mean.copy(), rank_var * n, rank_var
                continue
            delta = rank_mean - merged_mean
            merged = total + n
            merged_mean += delta * (n / merged)
            m2 += rank_var * n + delta * delta * (total * n / merged)
            total = merged
        if total <= 1:
            raise ValueError(f"expected more than 1 value per channel when using batch "
                             f"statistics, got {int(total)} in the global batch (local input "
                             f"of shape {x.shape}, axis={axis})")
        # One contributing process: its own variance, so a single process gives BatchNorm's bits.
        assert merged_mean is not None and m2 is not None and single_var is not None  # total > 1
        global_var = single_var.copy() if contributors == 1 else m2 / total
        return int(total), merged_mean, global_var

    def _forward_batch_stats(self, x: NDArray[Any], axis: int, weight: NDArray[Any] | None,
                             bias: NDArray[Any] | None, out: NDArray[Any] | None,
                             residual: NDArray[Any] | None, relu: bool) -> tuple[NDArray[Any], Any]:
        if not self.training:                   # track_running_stats=False in eval: local
            return super()._forward_batch_stats(x, axis, weight, bias, out, residual, relu)
        # The local statistics (the training kernel's, bit for bit, without normalizing:
        # one read of x), then one normalization pass with the global ones.
        local = dispatch.batch_statistics(x, axis, self.eps)
        total, mean, var = self._exchange_statistics(x, axis, x.size // self.num_features,
                                                     local.mean, local.batch_var)
        y, saved = dispatch.forward(x, axis, weight, bias, self.eps, out, mean, var,
                                     residual=residual, relu=relu)
        saved.stats = np.concatenate((mean, saved.invstd, var))
        saved.batch_stats = True
        self._sync_saved, self._sync_count, self._sync_axis = saved, total, axis
        return y, saved

    def _track_batch(self, saved: Any, count: int) -> None:
        super()._track_batch(saved, self._sync_count)

    def _forward_empty(self, x: NDArray[Any], out: NDArray[Any] | None, residual: ArrayLike | None,
                       synchronize: bool) -> NDArray[Any]:
        """A process's empty slice: checked like any input; in training it takes part in
        the exchange (count 0) and in the running-statistics update."""
        axis = normalize_axis(self.axis, x.ndim)
        if x.shape[axis] != self.num_features:
            raise ValueError(f"input has {x.shape[axis]} features on axis {axis} (shape "
                             f"{x.shape}), expected num_features={self.num_features}")
        check_activation(self.activation)
        if residual is not None:
            residual = check_residual(residual, x)
        checked_out = check_out(out, x)
        y = np.empty_like(x) if checked_out is None else checked_out
        slice_ = _EmptySlice(x.shape, x.dtype, residual is not None)
        if synchronize and (self.training or not self.track_running_stats):
            total, slice_.mean, slice_.batch_var = self._exchange_statistics(
                x, axis, 0, None, None)
            self._sync_count, self._sync_saved, self._sync_axis = total, slice_, axis
            if self.track_running_stats:
                self._track_batch(slice_, total)
        self._saved = slice_
        return y

    # ------------------------------------------------------------------ backward
    def backward(self, dy: ArrayLike, out: NDArray[Any] | None = None) -> NDArray[Any] | Any:
        """BatchNorm.backward through the global batch's statistics after a training
        forward (one exchange over comm; every process must call it); grad_weight and
        grad_bias receive this process's contribution."""
        saved = self._saved
        if saved is None or saved is not self._sync_saved:
            if isinstance(saved, _EmptySlice):      # an eval forward on an empty slice
                return self._backward_empty(dy, out, synchronize=False)
            return super().backward(dy, out)        # after an eval forward: local
        self._exchanged = False
        try:
            if isinstance(saved, _EmptySlice):
                return self._backward_empty(dy, out, synchronize=True)
            return super().backward(dy, out)
        except Exception:
            if not self._exchanged:
                self._abandon(_BACKWARD)
            raise

    def _exchange_sums(self, dtype: np.dtype[Any], ndim: int, count: int,
                       sums: NDArray[np.float64] | None) -> NDArray[np.float64]:
        """Global [Σ g·x̂, Σ g] per channel: every process's, added in rank order."""
        row = self._header_row(_BACKWARD, _OK, 2 * self.num_features, dtype, ndim,
                               self._sync_axis if self._sync_axis is not None else 0, count)
        if sums is not None:
            row[_HEADER:] = sums
        self._exchanged = True
        table = self._gather(row)
        total: NDArray[np.float64] = table[0, _HEADER:].copy()
        for rank_row in table[1:]:
            total += rank_row[_HEADER:]
        return total

    def _backward_kernel(self, dy: NDArray[Any], saved: Any, weight: NDArray[Any] | None,
                         out: NDArray[Any] | None) -> dispatch.BackwardResult:
        if saved is not self._sync_saved:
            return super()._backward_kernel(dy, saved, weight, out)
        channels, layout = self.num_features, saved.layout
        x_dense, y_dense, dy_user = saved.x_dense, saved.y_dense, dy
        if is_half(dy.dtype):
            # Computed on float32 copies and rounded once at the end: a float16 partial dx
            # would lose the bits that the statistics' part cancels.
            x_dense = x_dense.astype(np.float32)
            y_dense = None if y_dense is None else y_dense.astype(np.float32)
            dy_user = layout.to_user(layout.dense(dy).astype(np.float32))
        # Pass 1: the eval-mode backward w.r.t. the global statistics gives the partial dx
        # g * w * invstd (g: dy through the ReLU mask), dresidual = g and the local sums.
        local = dispatch.Saved(x_dense, layout, saved.stats[:2 * channels], False, y_dense,
                                saved.residual)
        partial = layout.to_user(_backward_workspace(layout, dy_user.dtype))
        partial, local_sums, dresidual = dispatch.backward(dy_user, local, weight, partial)
        sums = self._exchange_sums(dy.dtype, dy.ndim, dy.size // channels, local_sums)
        # Pass 2: dx = w * invstd * (g - Σg / M - x̂ * Σg·x̂ / M) = partial + x̂ * a + b, which
        # the eval forward kernel computes with weight a, bias b and residual = partial.
        gain = saved.invstd / self._sync_count
        if weight is not None:
            gain = gain * weight
        assert self._sync_axis is not None          # set by the synchronized forward
        dx, _ = dispatch.forward(layout.to_user(x_dense), self._sync_axis,
                                  -gain * sums[:channels], -gain * sums[channels:], self.eps,
                                  out if dy_user is dy else None, saved.mean, saved.batch_var,
                                  residual=partial)
        if dy_user is not dy:
            rounded = dx.astype(dy.dtype)           # float32 -> float16/bfloat16, rounded once
            if out is None:
                dx = rounded
            else:
                out[...] = rounded
                dx = out
            if dresidual is not None:
                dresidual = dresidual.astype(dy.dtype)     # g: exact in the data dtype
        return dx, local_sums, dresidual

    def _backward_empty(self, dy: ArrayLike, out: NDArray[Any] | None,
                        synchronize: bool) -> NDArray[Any] | tuple[NDArray[Any], NDArray[Any]]:
        saved = self._saved
        grad_y = check_like(dy, saved.shape, saved.dtype, "dy", "the last input")
        checked_out = check_out(out, grad_y, may_alias=((grad_y, "dy"),))
        if synchronize:
            self._exchange_sums(grad_y.dtype, grad_y.ndim, 0, None)
        dx = np.empty_like(grad_y) if checked_out is None else checked_out
        return (dx, np.empty_like(grad_y)) if saved.residual else dx

    # ------------------------------------------------------------------ construction helpers
    @overload
    @classmethod
    def convert_sync_batchnorm(cls, bn: BatchNorm, comm: Any = None) -> "SyncBatchNorm": ...
    @overload
    @classmethod
    def convert_sync_batchnorm(cls, bn: list[Any] | tuple[Any, ...],
                               comm: Any = None) -> list[Any]: ...
    @classmethod
    def convert_sync_batchnorm(cls, bn: BatchNorm | list[Any] | tuple[Any, ...],
                               comm: Any = None) -> "SyncBatchNorm | list[Any]":
        """A SyncBatchNorm with ``bn``'s hyperparameters, parameters, gradients, running
        statistics and mode (a copy: bn is unchanged).  A list or tuple of layers gives a
        list with every BatchNorm converted and the other layers as they are.  Collective
        over comm, like the constructor."""
        if isinstance(bn, (list, tuple)):
            return [cls.convert_sync_batchnorm(layer, comm)
                    if isinstance(layer, BatchNorm) else layer for layer in bn]
        if type(bn) not in (BatchNorm, SyncBatchNorm) and not _is_materialized_lazy(bn):
            raise TypeError(f"convert_sync_batchnorm takes a cpubn.BatchNorm (or a list of "
                            f"layers), got {type(bn).__name__}")
        layer = cls(comm=comm, **bn._config())
        layer.load_state_dict(bn.state_dict())
        if bn.affine:
            layer.grad_weight[...] = bn.grad_weight
            layer.grad_bias[...] = bn.grad_bias
        return layer.train(bn.training)

    _loadable_layers: ClassVar[tuple[str, ...]] = ("SyncBatchNorm", "BatchNorm", "LazyBatchNorm")

    @classmethod
    def load(cls, path: str | os.PathLike[str], comm: Any = None) -> "SyncBatchNorm":
        """A new SyncBatchNorm on comm (default COMM_WORLD) from a file written by
        ``save``: a SyncBatchNorm's, or a BatchNorm's (then converted).  Collective over
        comm, like the constructor."""
        _load_comm.comm = comm
        try:
            return super().load(path)
        finally:
            _load_comm.comm = None

    def __repr__(self) -> str:
        text = super().__repr__()
        name = self.comm.Get_name() or "comm"
        return (f"Sync{text[:-1]}, comm={name}(size={self.comm.Get_size()}))")


def _is_materialized_lazy(bn: object) -> bool:
    from .lazy import LazyBatchNorm
    return isinstance(bn, LazyBatchNorm) and not bn.has_uninitialized_params()

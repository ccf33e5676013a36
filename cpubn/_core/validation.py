"""Every check on user input lives here, and runs before any kernel or state change.

The kernels in src/ trust their preconditions (dtype, contiguity, lengths, no overlap);
these functions are what makes that trust safe.  Each raises TypeError for a wrong kind
of value and ValueError for a wrong value, with the offending value in the message.
"""
import operator
from typing import Any, cast

import numpy as np
from numpy.typing import DTypeLike, NDArray

from .._kernels.arrays import first_bounds_overlap

# Parameter and running-statistic dtypes (a BatchNorm's dtype).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)
_FLOAT16 = np.dtype(np.float16)
_DATA_DTYPES_TEXT = "float32, float64, float16 or bfloat16 (ml_dtypes)"


def _is_bfloat16(dtype: np.dtype[Any]) -> bool:
    """ml_dtypes.bfloat16 (optional package: only imported once such an array shows up)."""
    if dtype.name != "bfloat16":
        return False
    try:
        import ml_dtypes
    except ImportError:
        return False
    return bool(dtype == np.dtype(ml_dtypes.bfloat16))


def is_half(dtype: np.dtype[Any]) -> bool:
    """A half-precision data dtype (float16 or bfloat16) of an array that passed
    as_float_array: computed in float32, with float32 parameters."""
    return dtype.itemsize == 2


def is_masked(a: object) -> bool:
    """Whether a is a NumPy masked array.  A plain ndarray is answered without touching
    np.ma, which NumPy imports on first use (a megabyte of modules, inside whichever call
    first asks)."""
    return type(a) is not np.ndarray and isinstance(a, np.ma.MaskedArray)


def as_float_array(x: object, name: str = "input") -> NDArray[Any]:
    """x as an ndarray of a data dtype cpubn computes in (float32, float64, float16, or
    bfloat16 from ml_dtypes) in native byte order (no copy when it already is)."""
    if type(x) is np.ndarray and (x.dtype is _FLOAT32 or x.dtype is _FLOAT64):
        return x                          # the common case, decided by identity checks
    if is_masked(x):
        raise TypeError(f"{name} is a masked array: cpubn would ignore its mask; pass "
                        f"x.filled(value) or x.compressed() data as a plain ndarray")
    if isinstance(x, np.ndarray):
        array: NDArray[Any] = x
    else:
        try:
            array = np.asarray(x)
        except Exception as exc:  # ragged lists and other non-array objects
            raise TypeError(f"{name} must be an array of {_DATA_DTYPES_TEXT}, "
                            f"got {type(x).__name__}") from exc
    dtype = array.dtype
    if dtype in SUPPORTED_DTYPES or dtype == _FLOAT16 or _is_bfloat16(dtype):
        return array
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):    # non-native byte order
        return array.astype(dtype.newbyteorder("="))
    raise TypeError(f"{name} must have dtype {_DATA_DTYPES_TEXT}, got {dtype}")


def normalize_axis(axis: object, ndim: int, name: str = "input") -> int:
    """The feature axis as a non-negative int; the data must have at least 2 dims."""
    if ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch and features), "
                         f"got ndim={ndim}")
    index = check_axis(axis)
    if not -ndim <= index < ndim:
        raise ValueError(f"axis {index} is out of range for {name} with ndim={ndim}")
    return index % ndim


def check_axis(axis: object) -> int:
    """The feature axis as an int (bools are refused: True is not an axis)."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    try:
        return operator.index(axis)  # type: ignore[arg-type]  # TypeError is the check
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None


def check_bool(value: object, name: str) -> bool:
    """A flag that must be a real bool (training="no" must not mean True)."""
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_data(x: object, axis: object, num_features: int | None = None,
               name: str = "input") -> tuple[NDArray[Any], int]:
    """Validate a data array; return (x as ndarray, non-negative axis)."""
    array = as_float_array(x, name)
    if array.ndim == 1:
        raise ValueError(f"{name} must have at least 2 dimensions (batch and features), got "
                         f"ndim=1 (shape {array.shape}); "
                         f"{_reshape_hint(array.shape[0], num_features)}")
    index = normalize_axis(axis, array.ndim, name)
    if num_features is not None and array.shape[index] != num_features:
        raise ValueError(f"{name} has {array.shape[index]} features on axis {index} "
                         f"(shape {array.shape}), expected num_features={num_features}"
                         f"{_axis_hint(array.shape, index, num_features)}")
    if array.shape[index] == 0:
        raise ValueError(f"{name} has no features on axis {index} (shape {array.shape})")
    # Other empty axes are an empty batch, which the layers and the functional API take as
    # PyTorch does (an empty result, no statistics moved).
    return array, index


def _reshape_hint(length: int, num_features: int | None) -> str:
    """How to make a 1-D array of `length` values into (batch, features) rows."""
    one_sample = f"one sample of {length} features is x.reshape(1, -1)"
    batch = f"a batch of {length} single values is x.reshape(-1, 1)"
    if num_features == length:
        return one_sample + " (eval mode: training needs more than one sample)"
    if num_features == 1:
        return batch
    return f"{one_sample}, {batch}"


def _axis_hint(shape: tuple[int, ...], axis: int, num_features: int) -> str:
    """The likely fix when another axis has num_features entries: the layer was built for
    the other memory layout (channels-first vs channels-last)."""
    last = len(shape) - 1
    if axis != last and shape[last] == num_features:
        return (": did you mean axis=-1? (channels-last data such as NHWC: "
                f"BatchNorm({num_features}, axis=-1))")
    if axis != 1 and shape[1] == num_features:
        return (": did you mean axis=1? (channels-first data such as NCHW: "
                f"BatchNorm({num_features}, axis=1), the default)")
    return ""


def check_batch_stats_possible(x: NDArray[Any], axis: int) -> None:
    """Batch statistics need more than one value per channel, as in PyTorch."""
    if x.size // x.shape[axis] == 1:
        raise ValueError(f"expected more than 1 value per channel when using batch "
                         f"statistics, got input of shape {x.shape} (axis={axis})")


def check_like(y: object, shape: tuple[int, ...], dtype: np.dtype[Any], y_name: str,
               x_name: str) -> NDArray[Any]:
    """y must be an array of the given shape and dtype (dy against x)."""
    array = as_float_array(y, y_name)
    if array.shape != shape:
        raise ValueError(f"{y_name} has shape {array.shape}, expected {x_name}'s shape {shape}")
    if array.dtype != dtype:
        raise TypeError(f"{y_name} has dtype {array.dtype}, expected {x_name}'s dtype {dtype}")
    return array


# (array or None, its name in messages) pairs, as check_out and first_bounds_overlap take.
# Objects other than arrays (None) are skipped.
NamedArrays = tuple[tuple[object, str], ...]


def check_out(out: object, x: NDArray[Any], name: str = "out", may_alias: NamedArrays = (),
              must_not_overlap: NamedArrays = ()) -> NDArray[Any] | None:
    """out must be a writeable ndarray with x's shape and dtype.  It may be exactly one of
    `may_alias` (same memory, same strides: an in-place call) but must not otherwise share
    memory with those arrays or with any of `must_not_overlap`."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name} has shape {out.shape}, expected {x.shape}")
    if out.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {x.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if is_masked(out):
        raise TypeError(f"{name} is a masked array; pass a plain ndarray")
    if _self_overlapping(out):
        raise ValueError(f"{name} has overlapping elements (strides {out.strides}, e.g. a "
                         f"broadcast view): each output element needs its own memory")
    # Extents first (in C: cheap), the exact test only where they meet.
    hit = first_bounds_overlap(out, must_not_overlap)
    while hit >= 0:
        other, other_name = must_not_overlap[hit]
        if np.shares_memory(out, other):
            raise ValueError(f"{name} overlaps {other_name}; pass a separate array")
        hit = first_bounds_overlap(out, must_not_overlap, hit + 1)
    hit = first_bounds_overlap(out, may_alias)
    while hit >= 0:
        other, other_name = may_alias[hit]
        # first_bounds_overlap only reports ndarrays
        if np.shares_memory(out, other) and not _same_memory(out, cast("NDArray[Any]", other)):
            raise ValueError(f"{name} partially overlaps {other_name}; it may only be "
                             f"{other_name} itself or a separate array")
        hit = first_bounds_overlap(out, may_alias, hit + 1)
    return out


def overlaps_input(out: NDArray[Any], x: NDArray[Any]) -> bool:
    """For an `out` that passed check_out with x in may_alias: True when it is x's memory
    (an in-place call).  check_out left two cases where their extents meet: the same
    memory, or elements that interleave without sharing any (x = buf[:, 0::2], out =
    buf[:, 1::2]), which is not in place."""
    return out is x or (first_bounds_overlap(out, ((x, "x"),)) >= 0 and _same_memory(out, x))


def _self_overlapping(a: NDArray[Any]) -> bool:
    """True unless a's elements provably occupy distinct memory: sorted by stride, each
    axis must step over everything the faster axes span (dense, sliced and transposed
    arrays pass; broadcast stride-0 views and as_strided tricks do not)."""
    if a.flags.c_contiguous or a.flags.f_contiguous:
        return False
    span = a.itemsize
    for stride, extent in sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1):
        if stride < span:
            return True
        span = stride * (extent - 1) + span
    return False


def _same_memory(a: NDArray[Any], b: NDArray[Any]) -> bool:
    return bool(a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides)


def check_channel_array(values: object, num_features: int,
                        name: str) -> NDArray[Any] | None:
    """A per-channel array (weight, bias, running statistics): 1-D, length C, float."""
    if values is None:
        return None
    if (type(values) is np.ndarray and values.shape == (num_features,)
            and values.dtype.kind == "f"):
        return values                    # the common case: no conversion, nothing to say
    if is_masked(values):
        raise TypeError(f"{name} is a masked array; pass a plain ndarray")
    array = np.asarray(values)
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {array.dtype}")
    if array.shape != (num_features,):
        raise ValueError(f"{name} has shape {array.shape}, expected ({num_features},)")
    return array


# The smallest eps accepted.  Below about 1e-77, 1 / sqrt(eps) overflows float32, and a
# constant channel computed in float32 would give 0 * inf = NaN instead of exactly bias.
EPS_MIN = 1e-70
_INF = float("inf")


def check_state_array(array: object, num_features: int, name: str) -> NDArray[Any]:
    """A layer attribute that is written in place (running statistics, gradients): a
    writeable float ndarray of shape (num_features,)."""
    if (type(array) is np.ndarray and array.shape == (num_features,)
            and array.dtype.kind == "f" and array.flags.writeable):
        return array                     # the common case
    if not isinstance(array, np.ndarray) or is_masked(array):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got "
                        f"{type(array).__name__}")
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {array.dtype}")
    if array.shape != (num_features,):
        raise ValueError(f"{name} has shape {array.shape}, expected ({num_features},)")
    if not array.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place")
    return array


def check_eps(eps: object) -> float:
    if type(eps) is float and EPS_MIN <= eps < _INF:
        return eps                       # the common case
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a positive float, got {eps!r}")
    value = float(eps)
    if not EPS_MIN <= value < float("inf"):
        raise ValueError(f"eps must be a finite float >= {EPS_MIN} (smaller values overflow "
                         f"1 / sqrt(eps) in float32), got {value!r}")
    return value


def check_momentum(momentum: object, allow_none: bool = True) -> float | None:
    if momentum is None:
        if allow_none:
            return None
        raise TypeError("momentum must be a float in [0, 1], got None")
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum                  # the common case
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating,
                                                               np.integer)):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    value = float(momentum)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {value!r}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """An int >= 1 (bools and floats are TypeErrors), e.g. num_features or conv groups."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        count = operator.index(value)  # type: ignore[arg-type]  # TypeError is the check
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r}") from None
    if count < 1:
        raise ValueError(f"{name} must be >= 1, got {count}")
    return count


def check_num_features(num_features: object) -> int:
    return check_positive_int(num_features, "num_features")


def check_param_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        hint = ""
        if dtype == _FLOAT16 or _is_bfloat16(dtype):
            hint = (" (parameters stay float32 for half-precision inputs: use the default "
                    "dtype=float32 and pass float16/bfloat16 data)")
        raise TypeError(f"dtype must be float32 or float64, got {dtype}{hint}")
    return dtype



def check_activation(activation: object) -> str | None:
    """The fused activation: None or "relu"."""
    if activation is not None and not (isinstance(activation, str) and activation == "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation


def check_residual(residual: object, x: NDArray[Any]) -> NDArray[Any]:
    """The residual of a fused forward, y = act(bn(x) + residual): an array of x's shape
    and dtype, in any memory order.  It is only read (out must not overlap it)."""
    return check_like(residual, x.shape, x.dtype, "residual", "the input")

"""Every check on user input lives here, and runs before any kernel or state change.

The kernels in src/ trust their preconditions (dtype, contiguity, lengths, no overlap);
these functions are what makes that trust safe.  Each raises TypeError for a wrong kind
of value and ValueError for a wrong value, with the offending value in the message.
"""
import operator

import numpy as np

from ._arrays import first_bounds_overlap

# Parameter and running-statistic dtypes (a BatchNorm's dtype).
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)
_FLOAT16 = np.dtype(np.float16)
_DATA_DTYPES_TEXT = "float32, float64, float16 or bfloat16 (ml_dtypes)"


def _is_bfloat16(dtype):
    """ml_dtypes.bfloat16 (optional package: only imported once such an array shows up)."""
    if dtype.name != "bfloat16":
        return False
    try:
        import ml_dtypes
    except ImportError:
        return False
    return dtype == np.dtype(ml_dtypes.bfloat16)


def is_half(dtype):
    """A half-precision data dtype (float16 or bfloat16) of an array that passed
    as_float_array: computed in float32, with float32 parameters."""
    return dtype.itemsize == 2


def as_float_array(x, name="input"):
    """x as an ndarray of a data dtype cpubn computes in (float32, float64, float16, or
    bfloat16 from ml_dtypes) in native byte order (no copy when it already is)."""
    if type(x) is np.ndarray and (x.dtype is _FLOAT32 or x.dtype is _FLOAT64):
        return x                          # the common case, decided by identity checks
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array: cpubn would ignore its mask; pass "
                        f"x.filled(value) or x.compressed() data as a plain ndarray")
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and other non-array objects
            raise TypeError(f"{name} must be an array of {_DATA_DTYPES_TEXT}, "
                            f"got {type(x).__name__}") from exc
    dtype = x.dtype
    if dtype in SUPPORTED_DTYPES or dtype == _FLOAT16 or _is_bfloat16(dtype):
        return x
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):    # non-native byte order
        return x.astype(dtype.newbyteorder("="))
    raise TypeError(f"{name} must have dtype {_DATA_DTYPES_TEXT}, got {dtype}")


def normalize_axis(axis, ndim, name="input"):
    """The feature axis as a non-negative int; the data must have at least 2 dims."""
    if ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch and features), "
                         f"got ndim={ndim}")
    axis = check_axis(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {name} with ndim={ndim}")
    return axis % ndim


def check_axis(axis):
    """The feature axis as an int (bools are refused: True is not an axis)."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None


def check_bool(value, name):
    """A flag that must be a real bool (training="no" must not mean True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_data(x, axis, num_features=None, name="input"):
    """Validate a data array; return (x as ndarray, non-negative axis)."""
    x = as_float_array(x, name)
    if x.ndim == 1:
        raise ValueError(f"{name} must have at least 2 dimensions (batch and features), got "
                         f"ndim=1 (shape {x.shape}); {_reshape_hint(x.shape[0], num_features)}")
    axis = normalize_axis(axis, x.ndim, name)
    if num_features is not None and x.shape[axis] != num_features:
        raise ValueError(f"{name} has {x.shape[axis]} features on axis {axis} "
                         f"(shape {x.shape}), expected num_features={num_features}"
                         f"{_axis_hint(x.shape, axis, num_features)}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    return x, axis


def _reshape_hint(length, num_features):
    """How to make a 1-D array of `length` values into (batch, features) rows."""
    one_sample = f"one sample of {length} features is x.reshape(1, -1)"
    batch = f"a batch of {length} single values is x.reshape(-1, 1)"
    if num_features == length:
        return one_sample + " (eval mode: training needs more than one sample)"
    if num_features == 1:
        return batch
    return f"{one_sample}, {batch}"


def _axis_hint(shape, axis, num_features):
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


def check_batch_stats_possible(x, axis):
    """Batch statistics need more than one value per channel, as in PyTorch."""
    if x.size // x.shape[axis] == 1:
        raise ValueError(f"expected more than 1 value per channel when using batch "
                         f"statistics, got input of shape {x.shape} (axis={axis})")


def check_like(y, shape, dtype, y_name, x_name):
    """y must be an array of the given shape and dtype (dy against x)."""
    y = as_float_array(y, y_name)
    if y.shape != shape:
        raise ValueError(f"{y_name} has shape {y.shape}, expected {x_name}'s shape {shape}")
    if y.dtype != dtype:
        raise TypeError(f"{y_name} has dtype {y.dtype}, expected {x_name}'s dtype {dtype}")
    return y


def check_out(out, x, name="out", may_alias=(), must_not_overlap=()):
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
    if isinstance(out, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; pass a plain ndarray")
    if _self_overlapping(out):
        raise ValueError(f"{name} has overlapping elements (strides {out.strides}, e.g. a "
                         f"broadcast view): each output element needs its own memory")
    # Extents first (in C, about 30 ns a pair), the exact test only where they meet.
    hit = first_bounds_overlap(out, must_not_overlap)
    while hit >= 0:
        other, other_name = must_not_overlap[hit]
        if np.shares_memory(out, other):
            raise ValueError(f"{name} overlaps {other_name}; pass a separate array")
        hit = first_bounds_overlap(out, must_not_overlap, hit + 1)
    hit = first_bounds_overlap(out, may_alias)
    while hit >= 0:
        other, other_name = may_alias[hit]
        if np.shares_memory(out, other) and not _same_memory(out, other):
            raise ValueError(f"{name} partially overlaps {other_name}; it may only be "
                             f"{other_name} itself or a separate array")
        hit = first_bounds_overlap(out, may_alias, hit + 1)
    return out


def overlaps_input(out, x):
    """For an `out` that passed check_out with x in may_alias: True when it is x's memory
    (an in-place call).  A bounds test suffices there, and costs 50 ns."""
    return out is x or first_bounds_overlap(out, ((x, "x"),)) >= 0


def _self_overlapping(a):
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


def _same_memory(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides)


def check_channel_array(values, num_features, name):
    """A per-channel array (weight, bias, running statistics): 1-D, length C, float."""
    if values is None:
        return None
    if isinstance(values, np.ma.MaskedArray):
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


def check_state_array(array, num_features, name):
    """A layer attribute that is written in place (running statistics, gradients): a
    writeable float ndarray of shape (num_features,)."""
    if not isinstance(array, np.ndarray) or isinstance(array, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got "
                        f"{type(array).__name__}")
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {array.dtype}")
    if array.shape != (num_features,):
        raise ValueError(f"{name} has shape {array.shape}, expected ({num_features},)")
    if not array.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place")
    return array


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a positive float, got {eps!r}")
    eps = float(eps)
    if not EPS_MIN <= eps < float("inf"):
        raise ValueError(f"eps must be a finite float >= {EPS_MIN} (smaller values overflow "
                         f"1 / sqrt(eps) in float32), got {eps!r}")
    return eps


def check_momentum(momentum, allow_none=True):
    if momentum is None:
        if allow_none:
            return None
        raise TypeError("momentum must be a float in [0, 1], got None")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating,
                                                               np.integer)):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return momentum


def check_positive_int(value, name):
    """An int >= 1 (bools and floats are TypeErrors), e.g. num_features or conv groups."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_num_features(num_features):
    return check_positive_int(num_features, "num_features")


def check_param_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        hint = ""
        if dtype == _FLOAT16 or _is_bfloat16(dtype):
            hint = (" (parameters stay float32 for half-precision inputs: use the default "
                    "dtype=float32 and pass float16/bfloat16 data)")
        raise TypeError(f"dtype must be float32 or float64, got {dtype}{hint}")
    return dtype



def check_activation(activation):
    """The fused activation: None or "relu"."""
    if activation is not None and not (isinstance(activation, str) and activation == "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation


def check_residual(residual, x):
    """The residual of a fused forward, y = act(bn(x) + residual): an array of x's shape
    and dtype, in any memory order.  It is only read (out must not overlap it)."""
    return check_like(residual, x.shape, x.dtype, "residual", "the input")

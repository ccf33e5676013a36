"""The one table the loop layer is generated from.

setup.py renders every *.tp template under src/cpubn/_kernels with the names defined
here (Cython's Tempita, as scikit-learn does), before Cython runs:

  c/loops_float.h.tp  -> c/loops_float.h  the loops for float32 and float64 data
  c/loops_half.h.tp   -> c/loops_half.h   the loops for float16 and bfloat16 data
  c/loops_slab.h.tp   -> c/loops_slab.h   the channels-first short-run (slab) loops,
                                          for every data type
  loops.pxd.tp        -> loops.pxd        Cython declarations of every instance, and one
                                          fused-type dispatcher per loop
  forward.pyx.tp      -> forward.pyx      the compiled modules, whose entry points
  backward.pyx.tp     -> backward.pyx     dispatch on the type pairings of PAIRINGS

Adding a data type is a row of DATA_TYPES (and, for a half type, its conversions in
half_convert.h); adding a loop is a row of LOOPS plus its body in the C template(s).
Generated names are spelled out (run_mean_m2_f32, ...), so grep finds every definition.
"""
from collections import namedtuple

# suffix: of every generated name; c_type: the storage type (the same name in C and
# Cython); compute: the type of the per-channel constants the loops take; grouped: float
# data summed in groups of CPUBN_GROUP in float before double (else directly in double);
# half: None for data computed directly (loops_float.h.tp), else the conversions of a
# type staged through float tiles (loops_half.h.tp): to_float, from_float,
# vector_target, load8, store8, scalar_to_float, scalar_from_float, vector_index.
DataType = namedtuple("DataType", "suffix c_type compute grouped half")

DATA_TYPES = [
    DataType("f32", "float", "float", True, None),
    DataType("f64", "double", "double", False, None),
    DataType("f16", "cpubn_half", "float", True,
             ("cpubn_half_to_float", "cpubn_half_from_float", "avx,f16c", "CPUBN_F16_LOAD8",
              "CPUBN_F16_STORE8", "CPUBN_F16_SCALAR_TO_FLOAT", "CPUBN_F16_SCALAR_FROM_FLOAT",
              0)),
    DataType("bf16", "cpubn_bfloat16", "float", True,
             ("cpubn_bfloat16_to_float", "cpubn_bfloat16_from_float", "avx2",
              "CPUBN_BF16_LOAD8", "cpubn_bf16_store8", "cpubn_bfloat16_to_float",
              "cpubn_bfloat16_from_float", 1)),
]

# The loops the Cython kernels call, with their arguments: T is the data type, F the
# compute type (per-channel constants).  Every loop ends with `float* work`, the calling
# thread's scratch of CPUBN_WORK_FLOATS floats (loops.h); output loops take `stream`
# (non-temporal stores) before it.  Reductions accumulate in double.
LOOPS = [
    # channels-first: one contiguous run x[0:n] of one channel
    ("run_mean_m2", "const T* x, Py_ssize_t n, double* mean, double* m2, float* work"),
    ("run_normalize", "const T* x, T* y, Py_ssize_t n, F mean_hi, F scale, F shift, "
                      "int stream, float* work"),
    ("run_normalize_fused", "const T* x, const T* r, T* y, Py_ssize_t n, F mean_hi, F scale, "
                            "F shift, int relu, int stream, float* work"),
    ("run_grad_sums", "const T* dy, const T* x, Py_ssize_t n, double mean, double* sum_dy, "
                      "double* sum_dy_xmu, float* work"),
    ("run_masked_grad_sums", "const T* dy, const T* y, const T* x, T* g, Py_ssize_t n, "
                             "double mean, double* sum_g, double* sum_g_xmu, float* work"),
    ("run_input_grad", "const T* dy, const T* x, T* dx, Py_ssize_t n, F k, F a, F mean_hi, "
                       "F b, int stream, float* work"),
    # channels-last: a block of rows of a (rows, C) matrix
    ("rows_mean_m2", "const T* x, Py_ssize_t rows, Py_ssize_t C, double* mean, double* m2, "
                     "double* scratch, float* work"),
    ("rows_normalize", "const T* x, T* y, Py_ssize_t rows, Py_ssize_t C, const F* mean_hi, "
                       "const F* scale, const F* shift, int stream, float* work"),
    ("rows_normalize_fused", "const T* x, const T* r, T* y, Py_ssize_t rows, Py_ssize_t C, "
                             "const F* mean_hi, const F* scale, const F* shift, int relu, "
                             "int stream, float* work"),
    ("rows_grad_sums", "const T* dy, const T* x, Py_ssize_t rows, Py_ssize_t C, "
                       "const double* mean, double* sum_dy, double* sum_dy_xmu, "
                       "double* scratch, float* work"),
    ("rows_masked_grad_sums", "const T* dy, const T* y, const T* x, T* g, Py_ssize_t rows, "
                              "Py_ssize_t C, const double* mean, double* sum_g, "
                              "double* sum_g_xmu, double* scratch, float* work"),
    ("rows_input_grad", "const T* dy, const T* x, T* dx, Py_ssize_t rows, Py_ssize_t C, "
                        "const F* k, const F* a, const F* mean_hi, const F* b, int stream, "
                        "float* work"),
    # channels-first short runs: a slab of `items` batch items x `width` channels, runs of
    # S values (loops_slab.h.tp)
    ("slab_mean_m2", "const T* x, Py_ssize_t items, Py_ssize_t C, Py_ssize_t S, "
                     "Py_ssize_t width, double* mean, double* m2, float* work"),
    ("slab_grad_sums", "const T* dy, const T* y, const T* x, T* g, Py_ssize_t items, "
                       "Py_ssize_t C, Py_ssize_t S, Py_ssize_t width, const double* mean, "
                       "double* sum_dy, double* sum_dy_xmu, float* work"),
    ("slab_input_grad", "const T* dy, const T* x, T* dx, Py_ssize_t items, Py_ssize_t C, "
                        "Py_ssize_t S, Py_ssize_t width, const F* k, const F* a, "
                        "const F* mean_hi, const F* b, int training, float* work"),
    ("slab_normalize", "const T* x, const T* r, T* y, Py_ssize_t items, Py_ssize_t C, "
                       "Py_ssize_t S, Py_ssize_t width, const F* mean_hi, const F* scale, "
                       "const F* shift, int relu, int stream, float* work"),
]


def _arguments(loop):
    return [a.strip() for a in loop[1].split(",")]


def _typed(loop, data, compute):
    """The argument list with T and F replaced."""
    out = []
    for argument in _arguments(loop):
        words = argument.replace("*", " * ").split()
        words = [data if w == "T" else compute if w == "F" else w for w in words]
        out.append(" ".join(words).replace(" * ", "* ").replace(" *", "*"))
    return ", ".join(out)


def declaration(loop, dtype):
    """`void name_suffix(arguments)` of one instance, for the extern block."""
    return f"void {loop[0]}_{dtype.suffix}({_typed(loop, dtype.c_type, dtype.compute)})"


def fused_arguments(loop):
    """The dispatcher's arguments: data_t for T, floating for F."""
    return _typed(loop, "data_t", "floating")


def call_arguments(loop):
    return ", ".join(a.replace("*", " ").split()[-1] for a in _arguments(loop))


def uses_compute_type(loop):
    return any("F" in a.replace("*", " ").split() for a in _arguments(loop))


# The (data, parameters) type pairings the compiled entry points run: float32 and float64
# data with float32 or float64 parameters, half-precision data with float32 parameters
# (boundary.pxd: check_params refuses others), each computed in its data type's compute
# type.  kind is the data's boundary.pxd constant, param32 whether the parameters are
# float32.  The entry points' dispatch (entry_dispatch) is generated from this one list.
Pairing = namedtuple("Pairing", "kind param32 data param compute")

PAIRINGS = [
    Pairing("DATA_FLOAT32", True, "float", "float", "float"),
    Pairing("DATA_FLOAT32", False, "float", "double", "float"),
    Pairing("DATA_FLOAT64", True, "double", "float", "double"),
    Pairing("DATA_FLOAT64", False, "double", "double", "double"),
    Pairing("DATA_FLOAT16", True, "cpubn_half", "float", "float"),
    Pairing("DATA_BFLOAT16", True, "cpubn_bfloat16", "float", "float"),
]


def entry_dispatch(call, indent, params=True):
    """The branches of an entry point that run ``call`` for each pairing of PAIRINGS, as
    Cython: ``call`` casts each pointer to <D*> (the data type), <P*> (the parameters') or
    <F*> (the compute type), and the branch taken is the one matching ``kind`` (and
    ``param32``; with params=False, one branch per data type, for a call with no
    parameters).  No branch matches an impossible pairing: the caller's status stays
    UNSUPPORTED_TYPES.  Continuation lines are indented by ``indent`` spaces."""
    pairings = PAIRINGS if params else list({p.kind: p for p in PAIRINGS}.values())
    lines = []
    for i, pairing in enumerate(pairings):
        condition = f"kind == {pairing.kind}"
        if params:
            condition += " and param32" if pairing.param32 else " and not param32"
        typed = (call.replace("<D*>", f"<{pairing.data}*>")
                     .replace("<P*>", f"<{pairing.param}*>")
                     .replace("<F*>", f"<{pairing.compute}*>"))
        lines += [f"{'if' if i == 0 else 'elif'} {condition}:", f"    {typed}"]
    return ("\n" + " " * indent).join(lines)


NAMESPACE = dict(DATA_TYPES=DATA_TYPES, LOOPS=LOOPS, declaration=declaration,
                 fused_arguments=fused_arguments, call_arguments=call_arguments,
                 uses_compute_type=uses_compute_type, entry_dispatch=entry_dispatch)

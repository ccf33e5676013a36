"""Readers of other frameworks' BatchNorms: a torch module or an ONNX node in, the
constructor arguments, state dict and mode of the equal cpubn layer out.

They build no layer themselves, so the layers' ``from_torch`` / ``from_onnx`` class
methods and the public ``cpubn.porting`` both call down into this module.  Neither torch
nor onnx is imported until a reader needs it: cpubn itself depends on NumPy only.
"""
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .validation import check_axis

# A torch module's or state dict's running-statistics entries mark a BatchNorm.
RUNNING_KEYS = ("running_mean", "running_var")



class LayerArgs(NamedTuple):
    """What a reader returns: a layer's constructor arguments, its state dict and mode."""

    num_features: int
    config: dict[str, Any]          # the constructor's keyword arguments
    state: dict[str, Any]           # for load_state_dict
    training: bool


def to_numpy(value: Any) -> NDArray[Any]:
    """A torch tensor (any device, bfloat16 included) or array-like as a NumPy array."""
    if hasattr(value, "detach"):                      # a torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()                     # NumPy has no bfloat16; exact widening
        array: NDArray[Any] = value.numpy()
        return array
    return np.asarray(value)


def _param_dtype(arrays: Iterable[NDArray[Any] | None]) -> type[np.floating[Any]]:
    """float64 when the source parameters are float64, float32 otherwise (half-precision
    parameters widen exactly to float32, the dtype cpubn computes half data with)."""
    return (np.float64 if any(a is not None and a.dtype == np.float64 for a in arrays)
            else np.float32)


# ---------------------------------------------------------------------------- PyTorch
def torch_layer_args(module: Any, axis: int, dtype: DTypeLike | None) -> LayerArgs:
    """The arguments of a layer equal to a torch BatchNorm module, read as
    BatchNorm.from_torch documents (axis checked, dtype None: the module's); the arrays
    are copies."""
    try:
        from torch.nn.modules.batchnorm import _BatchNorm
    except ImportError:
        raise TypeError(f"from_torch needs a torch BatchNorm module, got "
                        f"{type(module).__name__} (and torch is not installed)") from None
    if not isinstance(module, _BatchNorm):
        raise TypeError(f"from_torch needs a torch.nn.BatchNorm1d/2d/3d or SyncBatchNorm, "
                        f"got {type(module).__name__}")
    uninitialized = getattr(module, "has_uninitialized_params", None)   # torch's Lazy*d
    if uninitialized is not None and uninitialized():
        raise ValueError(f"{type(module).__name__} has not seen an input yet, so it has no "
                         f"num_features: run it once (or use cpubn.LazyBatchNorm)")
    state = {name: to_numpy(value) for name, value in module.state_dict().items()}
    if dtype is None:
        dtype = _param_dtype([state.get(name) for name in ("weight", "bias") + RUNNING_KEYS])
    config = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats, axis=check_axis(axis),
                  dtype=dtype)
    return LayerArgs(module.num_features, config, state, bool(module.training))


# ---------------------------------------------------------------------------- ONNX
def import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError('reading ONNX models needs the onnx package: '
                          'pip install "cpubn[onnx]"') from None
    return onnx, numpy_helper


def _float32_decimal(value: float) -> float:
    """The shortest decimal that a float32 attribute holds: the value the exporter wrote
    (epsilon 1e-5 is stored as 9.99999975e-06 and read back as 1e-05)."""
    return float(str(np.float32(value)))


def _find_batchnorm_node(graph: Any, node_name: str | None) -> Any:
    nodes = [node for node in graph.node if node.op_type == "BatchNormalization"]
    if node_name is None:
        if len(nodes) != 1:
            raise ValueError(f"the model has {len(nodes)} BatchNormalization nodes "
                             f"({[n.name for n in nodes]}): pass node_name")
        return nodes[0]
    for node in nodes:
        if node.name == node_name:
            return node
    raise ValueError(f"no BatchNormalization node named {node_name!r}; the model has "
                     f"{[n.name for n in nodes]}")


def onnx_layer_args(model: Any, node_name: str | None, axis: int, dtype: DTypeLike | None,
                    values: Mapping[str, ArrayLike] | None) -> LayerArgs:
    """The arguments of a layer from a BatchNormalization node of an ONNX model (or the
    path of a .onnx file), read as BatchNorm.from_onnx documents: epsilon as stored,
    cpubn's momentum = 1 - ONNX's, training_mode for the mode, num_batches_tracked 0."""
    onnx, numpy_helper = import_onnx()
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    graph = model.graph
    node = _find_batchnorm_node(graph, node_name)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("spatial", 1) != 1:
        raise ValueError(f"node {node.name!r} has spatial=0 (statistics per element, "
                         f"opset < 9): cpubn normalizes per channel only")
    if len(node.input) != 5:
        raise ValueError(f"node {node.name!r} has {len(node.input)} inputs, expected 5 "
                         f"(X, scale, B, mean, var)")
    initializers = {t.name: t for t in graph.initializer}
    values = {} if values is None else values
    arrays: list[NDArray[Any]] = []
    for input_name in node.input[1:]:
        if input_name in values:
            arrays.append(np.asarray(values[input_name]))
        elif input_name in initializers:
            arrays.append(numpy_helper.to_array(initializers[input_name]))
        else:
            raise ValueError(f"input {input_name!r} of node {node.name!r} is neither an "
                             f"initializer nor in values=")
    scale, bias, mean, var = arrays
    if scale.ndim != 1:
        raise ValueError(f"node {node.name!r}: scale has shape {scale.shape}, expected 1-D")
    if dtype is None:
        dtype = _param_dtype(arrays)
    momentum = _float32_decimal(1.0 - _float32_decimal(attributes.get("momentum", 0.9)))
    config = dict(eps=_float32_decimal(attributes.get("epsilon", 1e-5)), momentum=momentum,
                  axis=check_axis(axis), dtype=dtype)
    state = {"weight": scale, "bias": bias, "running_mean": mean, "running_var": var,
             "num_batches_tracked": np.int64(0)}
    return LayerArgs(scale.shape[0], config, state, bool(attributes.get("training_mode", 0)))

"""Bring BatchNorm layers over from PyTorch and ONNX in one call.

* ``BatchNorm.from_torch(module)``: a layer from a ``torch.nn.BatchNorm1d/2d/3d`` (or
  ``SyncBatchNorm``, or a materialized ``LazyBatchNorm*d``) with its hyperparameters,
  parameters, running statistics, ``num_batches_tracked`` and train/eval mode.
* ``load_state_dicts(layers, state_dict)``: fill several cpubn layers from one
  whole-model PyTorch state dict (keys such as ``layer1.0.bn1.running_mean``), reporting
  missing and unexpected keys as ``torch.nn.Module.load_state_dict`` does.
* ``BatchNorm.from_onnx(model, node_name)``: a layer from a BatchNormalization node of
  an ONNX model (``pip install "cpubn[onnx]"``), and ``to_onnx_node(layer)`` back.

Neither torch nor onnx is imported until one of these functions needs it: cpubn itself
depends on NumPy only.
"""
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._validation import check_axis

if TYPE_CHECKING:
    from ._module import BatchNorm

__all__ = ["load_state_dicts", "to_onnx_node", "IncompatibleKeys"]

_Layer = TypeVar("_Layer", bound="BatchNorm")


class IncompatibleKeys(NamedTuple):
    """What load_state_dicts reports (the field names of torch's own result)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# A torch module's or state dict's running-statistics entries mark a BatchNorm.
_RUNNING_KEYS = ("running_mean", "running_var")


def _to_numpy(value: Any) -> NDArray[Any]:
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
def from_torch(cls: type[_Layer], module: Any, axis: int = 1, dtype: DTypeLike | None = None,
               activation: str | None = None, **kwargs: Any) -> _Layer:
    """A new ``cls`` layer equal to a torch BatchNorm module.

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
    state = {name: _to_numpy(value) for name, value in module.state_dict().items()}
    if dtype is None:
        dtype = _param_dtype([state.get(name) for name in ("weight", "bias") + _RUNNING_KEYS])
    layer = cls(module.num_features, eps=module.eps, momentum=module.momentum,
                affine=module.affine, track_running_stats=module.track_running_stats,
                axis=check_axis(axis), dtype=dtype, activation=activation, **kwargs)
    layer.load_state_dict(state)
    return layer.train(bool(module.training))


def _batchnorm_prefixes(keys: Iterable[str]) -> list[str]:
    """The module paths of a state dict that hold running statistics, in key order."""
    prefixes: list[str] = []
    for key in keys:
        prefix, _, name = key.rpartition(".")
        if name in _RUNNING_KEYS and prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def load_state_dicts(layers: dict[str, "BatchNorm"] | Iterable["BatchNorm"],
                     state_dict: Mapping[str, Any],
                     prefix_map: Mapping[str, str] | None = None,
                     strict: bool = True) -> IncompatibleKeys:
    """Load the BatchNorm entries of a whole-model PyTorch state dict into cpubn layers.

    layers: a dict ``{name: layer}`` whose names are the BatchNorms' module paths in the
        model (``"layer1.0.bn1"``: its keys are ``"layer1.0.bn1.weight"`` and so on), or a
        list of layers taken in the order of the state dict's BatchNorms (the module paths
        that have ``running_mean`` / ``running_var`` entries; each layer must track
        running statistics then).
    state_dict: ``model.state_dict()`` (torch tensors, converted here) or a dict of arrays.
    prefix_map: ``{name: module path}`` for the dict's names that differ from the paths
        (e.g. ``{"stem_bn": "features.1"}``).
    strict: like PyTorch, raise ValueError on any missing or unexpected key, before any
        layer changes.  With ``strict=False`` each layer takes what is there and keeps its
        own values for its missing keys.

    Missing keys are the layers' keys absent from ``state_dict``; unexpected keys are the
    entries under a layer's path that it has no use for, and the entries of any other
    BatchNorm of the model (a path with running statistics) that no layer received.
    Other entries (convolution weights, ...) are left for the caller and not reported.
    Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``.  Values are checked as
    ``BatchNorm.load_state_dict`` checks them; a failed load changes no layer."""
    renames: dict[str, str] = {} if prefix_map is None else dict(prefix_map)
    keys = list(state_dict)
    paths: dict[str, str]
    named: list[tuple[str, BatchNorm]]
    if isinstance(layers, dict):
        unknown = sorted(set(renames) - set(layers))
        if unknown:
            raise ValueError(f"prefix_map names {unknown}, which are not in layers")
        paths = {name: renames.get(name, name) for name in layers}
        named = list(layers.items())
    else:
        layer_list = list(layers)
        if renames:
            raise ValueError("prefix_map needs layers as a dict {name: layer}")
        found = _batchnorm_prefixes(keys)
        if len(found) != len(layer_list):
            raise ValueError(f"the state dict has {len(found)} BatchNorms ({found}) but "
                             f"{len(layer_list)} layers were given; pass a dict "
                             f"{{path: layer}} to choose")
        named = [(str(i), layer) for i, layer in enumerate(layer_list)]
        paths = {str(i): path for i, path in enumerate(found)}
    owners: dict[str, str] = {}
    for name, _ in named:
        path = paths[name]
        if path in owners:
            raise ValueError(f"layers {owners[path]!r} and {name!r} both load from {path!r}")
        owners[path] = name

    missing: list[str] = []
    unexpected: list[str] = []
    plans: list[tuple[BatchNorm, dict[str, NDArray[Any]]]] = []
    for name, layer in named:
        path = paths[name]
        wanted = {_join(path, key): key for key in layer._state_keys()}
        given: dict[str, NDArray[Any]] = {}
        for full, key in wanted.items():
            if full in state_dict:
                given[key] = _to_numpy(state_dict[full])
            else:
                missing.append(full)
        plans.append((layer, given))
        under = f"{path}." if path else ""
        unexpected += [k for k in keys if k.startswith(under) and k not in wanted
                       and (path or "." not in k)]
    for path in _batchnorm_prefixes(keys):
        if path not in owners:
            unexpected += [k for k in keys if k.rpartition(".")[0] == path]
    result = IncompatibleKeys(missing, unexpected)
    if strict and (missing or unexpected):
        raise ValueError(f"state dict mismatch: missing keys {missing}, unexpected keys "
                         f"{unexpected}")

    snapshots: list[_Snapshot] = []
    try:
        for layer, given in plans:
            snapshots.append(_snapshot(layer))
            if not given:
                continue
            if len(given) < len(layer._state_keys()):     # strict=False: keep the rest
                given = dict(layer.state_dict(), **given)
            layer.load_state_dict(given)
    except BaseException:
        for (layer, _), snapshot in zip(plans, snapshots):
            _restore(layer, snapshot)
        raise
    return result


_Snapshot = tuple[dict[str, Any], dict[str, NDArray[Any]] | None]


def _snapshot(layer: "BatchNorm") -> _Snapshot:
    """What _restore needs to undo a load_state_dict: the attributes (a LazyBatchNorm's
    materialization rebinds them) and copies of the arrays it writes in place."""
    materialized = getattr(layer, "num_features", None) is not None
    return dict(layer.__dict__), (layer.state_dict() if materialized else None)


def _restore(layer: "BatchNorm", snapshot: _Snapshot) -> None:
    attributes, state = snapshot
    layer.__dict__.clear()
    layer.__dict__.update(attributes)
    if state is not None:
        layer.load_state_dict(state)


# ---------------------------------------------------------------------------- ONNX
def _import_onnx() -> tuple[Any, Any]:
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


def from_onnx(cls: type[_Layer], model: Any, node_name: str | None = None, axis: int = 1,
              dtype: DTypeLike | None = None, values: Mapping[str, ArrayLike] | None = None,
              activation: str | None = None, **kwargs: Any) -> _Layer:
    """A new ``cls`` layer from a BatchNormalization node of an ONNX model.

    model: an ``onnx.ModelProto`` or the path of a ``.onnx`` file.
    node_name: the node's name; may be omitted when the model has exactly one.
    axis: the feature axis of the layer's data (ONNX's BatchNormalization normalizes
        axis 1; -1 if you feed the layer channels-last arrays).
    dtype: as in ``from_torch`` (float64 for float64 initializers, else float32).
    values: ``{input name: array}`` for the node's scale, B, mean and var when they are
        graph inputs rather than initializers.

    epsilon is copied; ONNX's momentum (the running statistics' weight, 0.9 by default)
    becomes cpubn's ``1 - momentum``.  ``training_mode=1`` gives a layer in training mode,
    otherwise it is in eval mode.  num_batches_tracked, which ONNX does not store, is 0.
    Note that ONNX's training mode updates running_var with the biased batch variance;
    cpubn, like PyTorch, uses the unbiased one."""
    onnx, numpy_helper = _import_onnx()
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
    layer = cls(scale.shape[0], eps=_float32_decimal(attributes.get("epsilon", 1e-5)),
                momentum=momentum, axis=check_axis(axis), dtype=dtype,
                activation=activation, **kwargs)
    layer.load_state_dict({"weight": scale, "bias": bias, "running_mean": mean,
                           "running_var": var, "num_batches_tracked": np.int64(0)})
    return layer.train(bool(attributes.get("training_mode", 0)))


def to_onnx_node(layer: "BatchNorm", input_name: str, output_name: str,
                 name: str | None = None) -> tuple[Any, list[Any]]:
    """The ONNX BatchNormalization node (opset 15) computing ``layer`` in eval mode, and
    its initializers: ``(node, [scale, B, mean, var])`` to add to a graph.

    The layer must normalize axis 1 (ONNX's channel axis), have running statistics and no
    fused activation; without affine parameters scale and B are 1 and 0."""
    onnx, numpy_helper = _import_onnx()
    if layer.axis != 1 or not layer.track_running_stats or layer.activation is not None:
        raise ValueError("to_onnx_node needs a layer with axis=1, running statistics and "
                         f"no activation, got {layer!r}")
    name = name or output_name
    channels = layer.num_features
    parameters = {
        "scale": layer.weight if layer.affine else np.ones(channels, layer.dtype),
        "B": layer.bias if layer.affine else np.zeros(channels, layer.dtype),
        "mean": layer.running_mean, "var": layer.running_var,
    }
    initializers = [numpy_helper.from_array(np.array(value), f"{name}.{key}")
                    for key, value in parameters.items()]
    momentum = 0.9 if layer.momentum is None else 1.0 - layer.momentum
    node = onnx.helper.make_node("BatchNormalization",
                                 [input_name] + [t.name for t in initializers], [output_name],
                                 name=name, epsilon=layer.eps, momentum=momentum)
    return node, initializers

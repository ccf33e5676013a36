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
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from ._core.foreign import RUNNING_KEYS, import_onnx, to_numpy
from ._layers.batchnorm import BatchNorm

__all__ = ["load_state_dicts", "to_onnx_node", "IncompatibleKeys"]


class IncompatibleKeys(NamedTuple):
    """What load_state_dicts reports (the field names of torch's own result)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _batchnorm_prefixes(keys: Iterable[str]) -> list[str]:
    """The module paths of a state dict that hold running statistics, in key order."""
    prefixes: list[str] = []
    for key in keys:
        prefix, _, name = key.rpartition(".")
        if name in RUNNING_KEYS and prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def load_state_dicts(layers: dict[str, BatchNorm] | Iterable[BatchNorm],
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

    Missing keys are the layers' keys absent from ``state_dict``, except a
    ``num_batches_tracked`` beside running statistics: a checkpoint from before PyTorch
    0.4.1 has none, and it loads as 0, as in PyTorch.  Unexpected keys are the
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
                given[key] = to_numpy(state_dict[full])
            elif key == "num_batches_tracked" and _join(path, "running_mean") in state_dict:
                # A checkpoint from before PyTorch 0.4.1: 0, as PyTorch fills it in.
                given[key] = np.int64(0)
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


def _snapshot(layer: BatchNorm) -> _Snapshot:
    """What _restore needs to undo a load_state_dict: the attributes (a LazyBatchNorm's
    materialization rebinds them) and copies of the arrays it writes in place."""
    materialized = getattr(layer, "num_features", None) is not None
    return dict(layer.__dict__), (layer.state_dict() if materialized else None)


def _restore(layer: BatchNorm, snapshot: _Snapshot) -> None:
    attributes, state = snapshot
    layer.__dict__.clear()
    layer.__dict__.update(attributes)
    if state is not None:
        layer.load_state_dict(state)


# ---------------------------------------------------------------------------- ONNX
def to_onnx_node(layer: BatchNorm, input_name: str, output_name: str,
                 name: str | None = None) -> tuple[Any, list[Any]]:
    """The ONNX BatchNormalization node (opset 15) computing ``layer`` in eval mode, and
    its initializers: ``(node, [scale, B, mean, var])`` to add to a graph.

    The layer must normalize axis 1 (ONNX's channel axis), have running statistics and no
    fused activation; without affine parameters scale and B are 1 and 0."""
    onnx, numpy_helper = import_onnx()
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

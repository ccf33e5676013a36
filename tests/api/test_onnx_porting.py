"""BatchNorm.from_onnx and to_onnx_node against ONNX's reference evaluator and, when it is
installed, onnxruntime (skipped without the onnx package: the optional ``onnx`` extra)."""
import numpy as np
import pytest

import cpubn

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

try:
    import onnxruntime
except ImportError:
    onnxruntime = None

OPSET = 15


def make_model(graph):
    """A model of the oldest IR version that carries OPSET, as the README builds it: a
    runtime older than the onnx package refuses the package's newest IR version."""
    opset = helper.make_opsetid("", OPSET)
    return helper.make_model(graph, opset_imports=[opset],
                             ir_version=helper.find_min_ir_version_for([opset]))
ELEM = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}
# float64 too is compared at 1e-7: ONNX stores epsilon as a float32 (1e-2 as 0.0099999998),
# from_onnx reads back the decimal it stands for, and the reference computes with the former.
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-7, atol=1e-7)}


def batchnorm_model(channels, rng, dtype=np.float32, ndim=4, name="bn", as_inputs=False,
                    training=False, **attributes):
    """A one-node model Y = BatchNormalization(X, scale, B, mean, var) with random,
    non-trivial parameters (initializers, or graph inputs with as_inputs=True)."""
    params = {
        "scale": rng.uniform(0.5, 1.5, channels).astype(dtype),
        "B": rng.standard_normal(channels).astype(dtype),
        "mean": rng.standard_normal(channels).astype(dtype),
        "var": rng.uniform(0.2, 3, channels).astype(dtype),
    }
    outputs = ["Y"] + (["running_mean", "running_var"] if training else [])
    node = helper.make_node("BatchNormalization", ["X"] + list(params), outputs, name=name,
                            **({"training_mode": 1} if training else {}), **attributes)
    x_info = helper.make_tensor_value_info("X", ELEM[dtype], [None, channels] + [None] * (ndim - 2))
    infos = [helper.make_tensor_value_info(o, ELEM[dtype], [None] * ndim if o == "Y" else
                                           [channels]) for o in outputs]
    param_infos = [helper.make_tensor_value_info(k, ELEM[dtype], [channels]) for k in params]
    initializers = [] if as_inputs else [numpy_helper.from_array(v, k) for k, v in params.items()]
    graph = helper.make_graph([node], "g", [x_info] + (param_infos if as_inputs else []), infos,
                              initializer=initializers)
    model = make_model(graph)
    onnx.checker.check_model(model)
    return model, params


def run_reference(model, x, params=None):
    feeds = {"X": x, **(params or {})}
    return ReferenceEvaluator(model).run(None, feeds)


def run_onnxruntime(model, x):
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})


SHAPES = [(2, 3, 4, 5), (6, 3), (3, 3, 7), (2, 3, 2, 3, 4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("attributes", [{}, {"epsilon": 1e-2}, {"momentum": 0.7}])
def test_eval_node_matches_reference(shape, dtype, attributes, rng):
    model, params = batchnorm_model(shape[1], rng, dtype, ndim=len(shape), **attributes)
    layer = cpubn.BatchNorm.from_onnx(model, "bn")
    assert not layer.training and layer.dtype == dtype
    assert layer.eps == attributes.get("epsilon", 1e-5)            # float32 attribute read back
    assert layer.momentum == pytest.approx(1 - attributes.get("momentum", 0.9), abs=1e-12)
    np.testing.assert_array_equal(layer.weight, params["scale"])
    np.testing.assert_array_equal(layer.running_var, params["var"])
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    np.testing.assert_allclose(layer(x), run_reference(model, x)[0], **TOL[dtype])


@pytest.mark.skipif(onnxruntime is None, reason="needs onnxruntime")
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_node_matches_onnxruntime(shape, rng):
    model, _ = batchnorm_model(shape[1], rng, ndim=len(shape), epsilon=1e-3)
    layer = cpubn.BatchNorm.from_onnx(model)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    np.testing.assert_allclose(layer(x), run_onnxruntime(model, x)[0], **TOL[np.float32])


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_training_node_matches_reference_output_and_running_mean(momentum, rng):
    model, _ = batchnorm_model(4, rng, training=True, momentum=momentum)
    layer = cpubn.BatchNorm.from_onnx(model)
    assert layer.training
    x = (rng.standard_normal((8, 4, 3, 3)) * 2 + 1).astype(np.float32)
    y, running_mean, _ = run_reference(model, x)
    np.testing.assert_allclose(layer(x), y, **TOL[np.float32])
    # ONNX weighs the old running mean by its momentum, cpubn by 1 - momentum: the same.
    np.testing.assert_allclose(layer.running_mean, running_mean, rtol=1e-6, atol=1e-6)
    # (running_var differs on purpose: ONNX folds in the biased batch variance, cpubn and
    # PyTorch the unbiased one.)


def test_graph_inputs_come_from_values_and_paths_are_read(rng, tmp_path):
    model, params = batchnorm_model(3, rng, as_inputs=True)
    with pytest.raises(ValueError, match="neither an initializer nor in values"):
        cpubn.BatchNorm.from_onnx(model)
    path = tmp_path / "bn.onnx"
    onnx.save(model, str(path))
    layer = cpubn.BatchNorm.from_onnx(path, values=params)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(layer(x), run_reference(model, x, params)[0], **TOL[np.float32])


def test_node_choice_and_refusals(rng):
    model, _ = batchnorm_model(3, rng)
    with pytest.raises(ValueError, match="no BatchNormalization node named 'other'"):
        cpubn.BatchNorm.from_onnx(model, "other")
    two = onnx.ModelProto()
    two.CopyFrom(model)
    two.graph.node.append(helper.make_node("BatchNormalization", ["Y", "scale", "B", "mean",
                                                                  "var"], ["Z"], name="bn2"))
    with pytest.raises(ValueError, match="2 BatchNormalization nodes"):
        cpubn.BatchNorm.from_onnx(two)
    assert cpubn.BatchNorm.from_onnx(two, "bn2").num_features == 3

    spatial = onnx.ModelProto()
    spatial.CopyFrom(model)
    spatial.graph.node[0].attribute.append(helper.make_attribute("spatial", 0))
    with pytest.raises(ValueError, match="spatial=0"):
        cpubn.BatchNorm.from_onnx(spatial)


def test_channels_last_layer_from_an_onnx_node(rng):
    model, _ = batchnorm_model(5, rng)
    layer = cpubn.BatchNorm.from_onnx(model, axis=-1)
    x = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    y_last = layer(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
    np.testing.assert_allclose(np.moveaxis(y_last, -1, 1), run_reference(model, x)[0],
                               **TOL[np.float32])


@pytest.mark.parametrize("affine", [True, False])
def test_to_onnx_node_round_trip(affine, rng):
    layer = cpubn.BatchNorm(4, eps=1e-3, momentum=0.2, affine=affine)
    for _ in range(3):
        layer(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 3 + 1)
    if affine:
        layer.weight[...] = rng.uniform(0.5, 1.5, 4)
    layer.eval()
    node, initializers = cpubn.to_onnx_node(layer, "X", "Y", name="bn")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4, 3, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4, 3, 3])], initializer=initializers)
    model = make_model(graph)
    onnx.checker.check_model(model)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(run_reference(model, x)[0], layer(x), **TOL[np.float32])
    if onnxruntime is not None:
        np.testing.assert_allclose(run_onnxruntime(model, x)[0], layer(x), **TOL[np.float32])
    back = cpubn.BatchNorm.from_onnx(model)
    assert back.momentum == pytest.approx(0.2) and back.eps == 1e-3
    np.testing.assert_array_equal(back.running_mean, layer.running_mean)


def test_to_onnx_node_refuses_what_onnx_cannot_express():
    with pytest.raises(ValueError, match="axis=1"):
        cpubn.to_onnx_node(cpubn.BatchNorm(3, axis=-1), "X", "Y")
    with pytest.raises(ValueError, match="activation"):
        cpubn.to_onnx_node(cpubn.BatchNorm(3, activation="relu"), "X", "Y")


# The TorchScript exporter (dynamo=False) needs no onnxscript; it warns that it is legacy.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_pytorch_export_gives_the_layer_from_torch_gives(rng):
    torch = pytest.importorskip("torch")
    import io
    module = torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.2)
    with torch.no_grad():
        module(torch.from_numpy(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 2 + 1))
    module.eval()
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.zeros(2, 4, 3, 3),), buffer, dynamo=False,
                      input_names=["X"], output_names=["Y"])
    from_onnx = cpubn.BatchNorm.from_onnx(onnx.load_from_string(buffer.getvalue()))
    from_torch = cpubn.BatchNorm.from_torch(module)
    assert (from_onnx.eps, from_onnx.momentum) == (from_torch.eps, from_torch.momentum)
    assert not from_onnx.training
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(from_onnx, key), getattr(from_torch, key))

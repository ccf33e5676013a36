"""Parity with torch.nn.BatchNorm{1,2,3}d over several training steps, then eval."""

import numpy as np
import pytest

import cpubn
from bn_testing import assert_close, make_x

torch = pytest.importorskip("torch")

CASES = [
    ("BatchNorm1d", (8, 5)),
    ("BatchNorm1d", (6, 5, 7)),
    ("BatchNorm2d", (4, 5, 6, 6)),
    ("BatchNorm3d", (3, 5, 3, 4, 4)),
]
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def make_pair(cls_name, C, dtype, axis=1, **kw):
    tbn = getattr(torch.nn, cls_name)(C, dtype=TORCH_DTYPE[dtype], **kw)
    bn = cpubn.BatchNorm(C, axis=axis, dtype=dtype, **kw)
    if tbn.affine:
        with torch.no_grad():
            tbn.weight.uniform_(0.5, 1.5)
            tbn.bias.uniform_(-1, 1)
        bn.weight[...] = tbn.weight.detach().numpy()
        bn.bias[...] = tbn.bias.detach().numpy()
    return tbn, bn


def to_channels_last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def from_channels_last(a):
    return np.moveaxis(a, -1, 1)


def run_torch(tbn, x, dy):
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tbn(xt)
    yt.backward(torch.from_numpy(dy))
    return yt.detach().numpy(), xt.grad.numpy()


def compare_state(bn, tbn, dtype, what):
    if tbn.affine:
        assert_close(bn.grad_weight, tbn.weight.grad.numpy(), dtype, "grad", f"grad_weight {what}")
        assert_close(bn.grad_bias, tbn.bias.grad.numpy(), dtype, "grad", f"grad_bias {what}")
    if tbn.track_running_stats:
        assert_close(bn.running_mean, tbn.running_mean.numpy(), dtype, "stat", f"running_mean {what}")
        assert_close(bn.running_var, tbn.running_var.numpy(), dtype, "stat", f"running_var {what}")
        assert bn.num_batches_tracked == int(tbn.num_batches_tracked), what
    else:
        assert bn.running_mean is None and bn.num_batches_tracked is None


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cls_name,shape", CASES, ids=[f"{c}-{len(s)}d" for c, s in CASES])
def test_training_steps_then_eval(cls_name, shape, dtype, momentum, layout, rng):
    torch.manual_seed(0)
    C = shape[1]
    last = layout == "channels_last"
    tbn, bn = make_pair(cls_name, C, dtype, axis=-1 if last else 1, momentum=momentum)
    for step, mode in enumerate(["train", "train", "train", "eval", "eval"]):
        if mode == "eval":
            tbn.eval()
            bn.eval()
        x = make_x(rng, shape, dtype, 1, loc=3.0)
        dy = rng.standard_normal(shape).astype(dtype)
        y_t, dx_t = run_torch(tbn, x, dy)
        if last:
            # Held: an eval-mode forward keeps only weak references for backward.
            x_last = to_channels_last(x)
            y = from_channels_last(bn(x_last))
            dx = from_channels_last(bn.backward(to_channels_last(dy)))
        else:
            y = bn(x)
            dx = bn.backward(dy)
        what = f"step {step} ({mode})"
        assert y.dtype == dtype and dx.dtype == dtype
        assert_close(y, y_t, dtype, "value", f"y {what}")
        assert_close(dx, dx_t, dtype, "grad", f"dx {what}")
        compare_state(bn, tbn, dtype, what)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_flags_parity(affine, track, training, rng):
    torch.manual_seed(1)
    tbn, bn = make_pair("BatchNorm2d", 4, np.float64, affine=affine, track_running_stats=track)
    tbn.train(training)
    bn.train(training)
    for step in range(2):
        x = make_x(rng, (3, 4, 5, 5), np.float64)
        dy = rng.standard_normal(x.shape)
        y_t, dx_t = run_torch(tbn, x, dy)
        assert_close(bn(x), y_t, np.float64, "value")
        assert_close(bn.backward(dy), dx_t, np.float64, "grad")
        compare_state(bn, tbn, np.float64, f"step {step}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_parity(dtype, training, rng):
    F = torch.nn.functional
    x = make_x(rng, (4, 3, 5, 5), dtype)
    w = rng.uniform(0.5, 1.5, 3).astype(dtype)
    b = rng.uniform(-1, 1, 3).astype(dtype)
    rm = rng.uniform(-1, 1, 3).astype(dtype)
    rv = rng.uniform(0.5, 2, 3).astype(dtype)
    rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y_t = F.batch_norm(torch.from_numpy(x), rm_t, rv_t, torch.from_numpy(w), torch.from_numpy(b),
                       training=training, momentum=0.3, eps=1e-3).numpy()
    y = cpubn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-3)
    assert_close(y, y_t, dtype)
    assert_close(rm, rm_t.numpy(), dtype, "stat")
    assert_close(rv, rv_t.numpy(), dtype, "stat")

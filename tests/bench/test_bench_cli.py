"""Smoke tests of ``python -m cpubn bench`` (cpubn/bench/): tiny shapes, few repeats.

They check that the command runs and reports what it promises, never how fast
anything is.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import reference as ref
from cpubn.bench import cli, peers

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

HAVE_ORT = peers.import_onnxruntime() is not None

FAST = ["--repeats", "2", "--threads", "1", "--copy-mib", "1"]
RESULT_FIELDS = {"shape", "layout", "array_shape", "axis", "op", "dtype", "threads", "size_bytes",
                 "bytes_moved", "check", "peers", "copy_gbps", "roofline_ms",
                 "speedup_vs_numpy", "speedup_vs_torch", "speedup_vs_onnxruntime", "x_copy",
                 "alloc_over_out"}
TIMED_FIELDS = {"median_ms", "min_ms", "repeats", "gbps", "x_roofline", "samples_ms"}


def run_bench(tmp_path, *args):
    path = tmp_path / "bench.json"
    rc = cli.main([*args, "--json", str(path)])
    return rc, json.loads(path.read_text())


def test_quick_run_reports_every_case(tmp_path, capsys):
    rc, report = run_bench(tmp_path, "--quick", "--shape", "4,8,5,5", "--shape", "16,8",
                           "--shape", "1,8,3,3", *FAST)
    assert rc == 0
    assert {"machine", "config", "copy_bandwidth_gbps", "results", "tiny"} <= set(report)
    assert report["config"]["threads"] == [1] and report["config"]["dtype"] == "float32"
    assert report["copy_bandwidth_gbps"]["1"] > 0

    cases = {(tuple(r["shape"]), r["layout"], r["op"]) for r in report["results"]}
    assert cases == (
        {((4, 8, 5, 5), layout, op) for layout in ("nchw", "nhwc")
         for op in ("train", "eval", "backward")}
        | {((16, 8), "nchw", op) for op in ("train", "eval", "backward")}  # 2-D: one layout
        | {((1, 8, 3, 3), layout, "eval") for layout in ("nchw", "nhwc")}  # batch 1: inference
    )
    for r in report["results"]:
        expected = {"copy", "cpubn_out", "cpubn", "numpy"} | ({"torch"} if HAVE_TORCH else set())
        if HAVE_TORCH and r["op"] == "backward" and len(r["shape"]) == 4:
            expected.add("torch_other")         # PyTorch's other memory format
        if HAVE_ORT and r["op"] == "eval" and r["layout"] == "nchw":
            expected.add("onnxruntime")         # ONNX BatchNormalization takes NCHW only
        assert RESULT_FIELDS <= set(r)
        assert r["check"] == "ok"
        assert set(r["peers"]) == expected
        copy, out = r["peers"]["copy"]["median_ms"], r["peers"]["cpubn_out"]["median_ms"]
        assert r["x_copy"] == pytest.approx(out / copy)
        assert r["alloc_over_out"] == pytest.approx(r["peers"]["cpubn"]["median_ms"] / out)
        assert (r["speedup_vs_onnxruntime"] is not None) == ("onnxruntime" in expected)
        if "torch_other" in expected:           # against the faster of the two layouts
            fastest = min(r["peers"][p]["median_ms"] for p in ("torch", "torch_other"))
            assert r["speedup_vs_torch"] == pytest.approx(fastest / r["peers"]["cpubn"]["median_ms"])
        for p in r["peers"].values():
            assert TIMED_FIELDS <= set(p) and p["repeats"] == 2 and p["median_ms"] > 0
        assert r["speedup_vs_numpy"] > 0
        assert (r["speedup_vs_torch"] is not None) == HAVE_TORCH
        assert r["bytes_moved"] == (3 if r["op"] == "backward" else 2) * r["size_bytes"]
        assert r["array_shape"][-1 if r["layout"] == "nhwc" else 1] == r["shape"][1]

    tiny = report["tiny"]
    assert tiny["shape"] == [1, 16] and not tiny["errors"]
    assert {"cpubn.BatchNorm", "numpy"} <= set(tiny["us"])
    assert HAVE_TORCH == ("torch.nn.BatchNorm1d" in tiny["us"])
    assert [t["shape"] for t in report["tiny_calls"]] == [[1, 16], [1, 64, 56, 56],
                                                          [1, 256, 14, 14]]
    for t in report["tiny_calls"]:
        assert not t["errors"] and HAVE_ORT == ("onnxruntime" in t["us"])
    assert HAVE_TORCH == ("torch.nn.BatchNorm2d" in report["tiny_calls"][1]["us"])

    out, err = capsys.readouterr()
    assert "vs torch" in out and "4x8x5x5" in out and "Tiny call" in out
    assert "xcopy" in out and "alloc/" in out and ("vs ort" in out)
    # Every target is reported, met or missed.
    targets = out[out.index("Targets ("):]
    for line in ("train    out= / copy", "eval     out= / copy", "backward out= / copy",
                 "bn(x) on (1, 16) float32 eval"):
        assert line in targets
    assert ("at least as fast as torch" in targets) == HAVE_TORCH
    assert "[1/" in err  # progress goes to stderr


def test_thread_list_float64_one_layout(tmp_path, capsys):
    rc, report = run_bench(tmp_path, "--shape", "6,4,3,3", "--threads", "1,2", "--dtype", "float64",
                           "--layout", "nhwc", "--ops", "train", "--no-torch", "--no-tiny",
                           "--repeats", "1", "--copy-mib", "1")
    assert rc == 0
    assert report["tiny"] is None
    assert [(r["threads"], r["layout"], r["op"], r["dtype"]) for r in report["results"]] == [
        (1, "nhwc", "train", "float64"), (2, "nhwc", "train", "float64")]
    assert "torch" not in report["results"][0]["peers"]
    assert "Thread scaling 1 -> 2" in capsys.readouterr().out


def test_library_errors_and_wrong_results_are_reported(tmp_path, monkeypatch, capsys):
    """A failing or wrong cpubn shows up in the table, the JSON and the exit status."""
    import cpubn

    def broken_backward(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    forward = cpubn.batch_norm_forward

    def wrong_forward(*args, **kwargs):
        y, mean, invstd = forward(*args, **kwargs)
        return y + 1, mean, invstd

    monkeypatch.setattr(cpubn, "batch_norm_backward", broken_backward)
    monkeypatch.setattr(cpubn, "batch_norm_forward", wrong_forward)
    rc, report = run_bench(tmp_path, "--shape", "4,8,5,5", "--layout", "nchw", "--no-torch",
                           "--no-tiny", *FAST)
    assert rc == 1
    by_op = {r["op"]: r for r in report["results"]}
    assert "kernel exploded" in by_op["backward"]["peers"]["cpubn"]["error"]
    assert "differs from NumPy" in by_op["train"]["check"]
    out, err = capsys.readouterr()
    assert "ERR" in out and "differs from NumPy" in out and "kernel exploded" in err


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedups.png"
    rc, _ = run_bench(tmp_path, "--shape", "4,8,5,5", "--ops", "eval", "--no-tiny",
                      "--plot", str(png), *FAST)
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert cli.main(["--plot", "x.png", "--shape", "4,8"]) == 2
    assert "matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--shape", "0,3"], ["--shape", "5"], ["--shape", "a,b"],
                                  ["--threads", "0"], ["--ops", "infer"], ["--quick", "--full"]])
def test_bad_arguments(args):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_numpy_peer_matches_reference(dtype, axis):
    """The NumPy baseline computes BatchNorm (it is also what cpubn's results are checked against)."""
    rng = np.random.default_rng(3)
    shape = (6, 5, 4, 3) if axis == 1 else (6, 4, 3, 5)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, 5).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    rm, rv = np.zeros(5, dtype), np.ones(5, dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-10

    y, mean, invstd = peers.numpy_batch_norm_forward(x, w, b, rm, rv, training=True, axis=axis)
    y_ref, mean_ref, invstd_ref, rm_ref, rv_ref = ref.functional_forward(
        x, w, b, np.zeros(5), np.ones(5), training=True, axis=axis)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(mean.ravel(), mean_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(rm, rm_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, rv_ref, rtol=tol, atol=tol)

    y_eval, _, _ = peers.numpy_batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)
    y_eval_ref = ref.functional_forward(x, w, b, rm, rv, training=False, axis=axis)[0]
    np.testing.assert_allclose(y_eval, y_eval_ref, rtol=tol, atol=tol)

    dx, dw, db = peers.numpy_batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean_ref, invstd_ref, w, axis=axis)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, dx_ref, rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(dw, dw_ref, rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(db, db_ref, rtol=10 * tol, atol=10 * tol)


def test_python_m_cpubn_bench(tmp_path):
    """The command line entry point is wired to cpubn.bench.cli.main."""
    path = tmp_path / "cli.json"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "cpubn", "bench", "--shape", "3,4,2,2", "--ops", "eval",
         "--no-torch", "--no-tiny", *FAST, "--json", str(path)],
        capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "3x4x2x2" in proc.stdout
    assert len(json.loads(path.read_text())["results"]) == 2


def test_contention_bench_reports_median_p90_and_target(tmp_path, capsys):
    path = tmp_path / "contention.json"
    rc = cli.main(["--contention", "--shape", "4,3,8,8", "--samples", "5",
                      "--layout", "nchw", "--no-torch", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["busy"] is True
    assert [(r["layout"], r["op"]) for r in report["results"]] == [
        ("nchw", "train"), ("nchw", "eval"), ("nchw", "backward")]
    for r in report["results"]:
        stats = r["stats"]
        for name in ("cpubn 1 thread", "cpubn default", "numpy"):
            assert stats[name]["samples"] == 5
            assert 0 < stats[name]["median_ms"] <= stats[name]["p90_ms"]
        assert stats["p90_vs_one_thread_median"] == pytest.approx(
            stats["cpubn default"]["p90_ms"] / stats["cpubn 1 thread"]["median_ms"])
    out = capsys.readouterr().out
    assert "one busy process" in out and "target" in out and "of 3 cases" in out


def test_targets_are_judged_from_the_records():
    from cpubn.bench.report import format_targets

    def record(shape, op, x_copy, threads=2, out_ms=1.0, alloc=1.0, vs_torch=1.2):
        size = int(np.prod(shape)) * 4
        return {"shape": list(shape), "layout": "nchw", "op": op, "threads": threads,
                "size_bytes": size, "x_copy": x_copy, "alloc_over_out": alloc,
                "speedup_vs_torch": vs_torch, "busy": None,
                "peers": {"cpubn_out": {"median_ms": out_ms}}}

    big = (32, 256, 56, 56)
    report = {"config": {"threads": [1, 2]}, "tiny": {"dtype": "float32", "us": {"cpubn.BatchNorm": 2.5}},
              "results": [record(big, "train", 1.5), record((32, 2048, 7, 7), "train", 3.5),
                          record(big, "eval", 1.0, alloc=1.3, vs_torch=0.9),
                          record(big, "eval", 1.0, threads=1, out_ms=1.9)]}
    text = format_targets(report)
    assert "train    out= / copy: median 2.50 (target <= 1.8, MISSED), worst 3.50 32x2048x7x7" in text
    assert "eval     out= / copy: median 1.00 (target <= 1.1, met), worst 1.00" in text
    assert "allocating / out= from 16 MiB: worst 1.30" in text and "MISSED" in text
    assert "1 -> 2 threads from 16 MiB (out=): worst 1.90" in text
    assert "2 of 3 cases; slower: 32x256x56x56 nchw eval 0.90x (MISSED)" in text
    assert "2.50 us (target <= 3.0 us, met)" in text


def test_mlp_targets_are_judged_from_the_records():
    from cpubn.bench.report import format_targets

    def record(shape, op, threads, vs_torch, cpubn_ms=1.0):
        return {"shape": list(shape), "layout": "nchw", "op": op, "threads": threads,
                "size_bytes": int(np.prod(shape)) * 4, "speedup_vs_torch": vs_torch,
                "busy": None, "peers": {"cpubn": {"median_ms": cpubn_ms}}}

    big = (4096, 1024)                      # 4M elements: judged for scaling
    results = [record((64, 128), "train", 1, 0.8), record((256, 512), "train", 1, 1.5),
               record(big, "train", 1, 1.4, cpubn_ms=3.0),
               record((64, 128), "train", 2, 1.1), record((256, 512), "train", 2, 1.2),
               record(big, "train", 2, 1.5, cpubn_ms=2.5),
               record(big, "backward", 1, 1.3, cpubn_ms=3.0),
               record(big, "backward", 2, 1.3, cpubn_ms=2.0),
               record((32, 8, 4, 4), "train", 2, 0.5)]          # not 2-D: not judged here
    text = format_targets({"config": {"threads": [1, 2]}, "tiny": None, "results": results})
    assert ("1 thread  train    median 1.40x (target >= 1.3, met); 2 of 3 cases >= 1.0x "
            "(MISSED); below: 64x128 0.80x") in text
    assert "2 threads train    median 1.20x (target >= 1.3, MISSED); 3 of 3 cases >= 1.0x (met)" in text
    assert ("1 -> 2 threads, train and backward from 4M elements: worst 1.20 4096x1024 train, "
            "median 1.35 (target >= 1.4, MISSED)") in text
    assert "2-D" not in format_targets({"config": {"threads": [2]}, "tiny": None,
                                         "results": results[-1:]})


def test_mlp_grid_runs_at_one_and_two_threads(tmp_path, monkeypatch):
    from cpubn.bench import batchnorm
    monkeypatch.setattr(batchnorm, "SHAPES_MLP", ((16, 8), (8, 16)))
    rc, report = run_bench(tmp_path, "--mlp", "--repeats", "2", "--copy-mib", "1",
                           "--no-tiny", "--no-torch", "--ops", "train")
    assert rc == 0
    assert report["config"]["threads"] == [1, 2] and report["config"]["mlp"]
    assert {(tuple(r["shape"]), r["threads"]) for r in report["results"]} == {
        (s, n) for s in ((16, 8), (8, 16)) for n in (1, 2)}


def test_copy_baseline_writes_its_own_buffer():
    """The copy must not warm the out= buffer for the call after it."""
    buf = peers.BenchBuffers((4, 8), np.float32, np.random.default_rng(0))
    fns, _ = peers.build_peers(None, None, lambda src, dst, n: dst.__setitem__(..., src),
                               buf, "nchw", "eval", 1, names=("copy",))
    fns["copy"]()
    assert np.array_equal(buf.copy_out, buf.x) and not np.any(buf.out)


@pytest.mark.skipif(not HAVE_ORT, reason="needs onnx and onnxruntime")
def test_onnxruntime_peer_builds_the_oldest_ir_version_of_its_opset(monkeypatch):
    """A runtime older than the onnx package refuses the package's newest IR version; the
    peer's model carries the oldest one its opset allows."""
    onnxruntime, onnx = peers.import_onnxruntime()
    newest_accepted = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", 15)])
    real_session = onnxruntime.InferenceSession

    def old_runtime(model_bytes, *args, **kwargs):
        model = onnx.ModelProto.FromString(model_bytes)
        if model.ir_version > newest_accepted:
            raise RuntimeError(f"Unsupported model IR version: {model.ir_version}")
        return real_session(model_bytes, *args, **kwargs)
    monkeypatch.setattr(onnxruntime, "InferenceSession", old_runtime)
    c = 4
    session = peers.onnxruntime_session((onnxruntime, onnx), (2, c, 3, 3), np.float32,
                                        np.ones(c), np.zeros(c), np.zeros(c), np.ones(c), 1)
    x = np.arange(2 * c * 9, dtype=np.float32).reshape(2, c, 3, 3)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x / np.sqrt(1 + 1e-5),
                               rtol=1e-6)

"""SyncBatchNorm: in one process (COMM_WORLD of size 1: BatchNorm's results, the API,
the collectives it calls) and under `mpiexec -n 2` / `-n 3` (tests/mpi_sync_cases.py
against one BatchNorm on the concatenated batch and the float64 reference;
tests/mpi_sync_failures.py: every error ends the job on every process)."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import cpubn
from bn_testing import bitwise_equal, make_x

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT = 120

try:
    from mpi4py import MPI
except ImportError:
    MPI = None

needs_mpi4py = pytest.mark.skipif(
    MPI is None, reason='mpi4py is not installed (pip install ".[mpi]"): SyncBatchNorm untested')


def _mpiexec():
    beside_python = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


needs_mpiexec = pytest.mark.skipif(
    MPI is None or _mpiexec() is None,
    reason='mpi4py or mpiexec is missing (pip install ".[mpi]" installs both)')


def run_mpi(n, script, *args, report_dir=None):
    """`mpiexec -n N python -m mpi4py script args` (script: a file in tests/, or "-m" and a
    module before args) with the cpubn this test imported; its
    process group is killed if it outlives TIMEOUT (a hang fails instead of blocking).
    Returns (exit status, output, {rank: the lines it reported})."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CPUBN_MPI_REPORT_DIR=str(report_dir or ""),
               PYTHONPATH=os.pathsep.join(filter(None, [
                   str(pathlib.Path(cpubn.__file__).resolve().parent.parent),
                   os.environ.get("PYTHONPATH")])))
    command = [_mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py",
               script if script == "-m" else str(HERE / script), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(command)} did not end within {TIMEOUT} s")
    lines = {} if report_dir is None else {
        int(path.stem[4:]): path.read_text().splitlines()
        for path in pathlib.Path(report_dir).glob("rank*.txt")}
    return process.returncode, stdout + stderr, lines


# ---------------------------------------------------------------------- several processes
@needs_mpiexec
@pytest.mark.parametrize("n", [2, 3])
def test_matches_one_batchnorm_on_the_global_batch(n, tmp_path):
    rc, output, lines = run_mpi(n, "mpi_sync_cases.py", report_dir=tmp_path)
    assert rc == 0, output
    assert sorted(lines) == list(range(n)), output
    for rank in range(n):
        assert lines[rank][-1].endswith("checks ok") and int(lines[rank][-1].split()[0]) > 500


# Process 1 differs from the others; the error each process must raise.
FAILURES = {
    "num_features": ("ValueError", "ValueError", "num_features differs"),
    "dtype": ("ValueError", "ValueError", "dtype differs"),
    "axis": ("ValueError", "ValueError", "axis differs"),
    "eps_nan": ("RuntimeError", "ValueError", "failed on process(es) [1]"),
    "input_dtype": ("ValueError", "ValueError", "dtype differs across processes"),
    "input_layout": ("ValueError", "ValueError", "ndim differs across processes"),
    "shape": ("RuntimeError", "ValueError", "failed on process(es) [1]"),
    "dy_shape": ("RuntimeError", "ValueError", "failed on process(es) [1]"),
    "one_value": ("ValueError", "ValueError", "expected more than 1 value per channel"),
    "layer_order": ("RuntimeError", "RuntimeError", "not in the same call"),
}


@needs_mpiexec
@pytest.mark.parametrize("case", sorted(FAILURES))
def test_errors_raise_on_every_process(case, tmp_path):
    others, odd, text = FAILURES[case]
    n = 3 if case in ("eps_nan", "shape") else 2
    rc, output, lines = run_mpi(n, "mpi_sync_failures.py", case, report_dir=tmp_path)
    assert rc == 0, output
    assert sorted(lines) == list(range(n)), output
    for rank in range(n):
        error, recovered = lines[rank]
        assert error.startswith((odd if rank == 1 else others) + ":"), (rank, output)
        assert text in error or rank == 1, (rank, output)
        assert recovered == "recovered"     # the processes are still in step afterwards


@needs_mpiexec
def test_uncaught_error_on_one_process_ends_the_job(tmp_path):
    # Process 1 fails outside cpubn while the others wait in a forward: under
    # `python -m mpi4py` the job aborts instead of hanging.
    rc, output, lines = run_mpi(2, "mpi_sync_failures.py", "crash", report_dir=tmp_path)
    assert rc != 0 and "an error outside cpubn" in output
    assert "recovered" not in str(lines)


@needs_mpiexec
def test_data_parallel_example_matches_one_process():
    pytest.importorskip("sklearn")
    rc, output, _ = run_mpi(2, "-m", "cpubn.examples.data_parallel", "--epochs", "2")
    assert rc == 0, output
    rows = [line.split("|") for line in output.splitlines() if line[:5].strip().isdigit()]
    assert len(rows) == 2, output
    for row in rows:
        single, sync, local = ([float(v) for v in cell.split()] for cell in row[1:4])
        assert abs(single[0] - sync[0]) < 1e-5 and single[1] == sync[1], output
        assert abs(single[0] - local[0]) > 1e-3, output     # unsynchronized: another model
        assert float(row[3].split()[-1]) < 1e-5, output     # max |weight diff|
    assert ("2 processes, SyncBatchNorm: parameters and running statistics differ across "
            "processes by up to 0.0e+00") in output


@needs_mpiexec
def test_bench_sync_relaunches_under_mpiexec(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(cpubn.__file__).resolve().parent.parent))
    env.pop("CPUBN_BENCH_SYNC_CHILD", None)
    result = subprocess.run([sys.executable, "-m", "cpubn", "bench", "--sync", "--shape", "6,3",
                             "--layout", "nhwc", "--repeats", "2", "--json",
                             str(tmp_path / "sync.json")],
                            capture_output=True, text=True, env=env, timeout=TIMEOUT,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mpiexec -n 2 python -m mpi4py -m cpubn bench --sync" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("6x3 "))
    assert row.split()[1] == "nhwc" and row.endswith("%")
    import json
    report = json.loads((tmp_path / "sync.json").read_text())
    assert report["processes"] == 2 and len(report["cases"][0]["samples_s"]["sync"]) == 2


# ---------------------------------------------------------------------- one process
def test_import_without_mpi4py_and_the_install_hint():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import numpy as np, cpubn\n"
            "print(cpubn.BatchNorm(3)(np.ones((2, 3))).shape)\n"
            "try:\n    cpubn.SyncBatchNorm(3)\n"
            "except ImportError as exc:\n    print('ImportError:', exc)\n")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(cpubn.__file__).resolve().parent.parent))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "(2, 3)" in result.stdout
    assert 'ImportError: cpubn.SyncBatchNorm needs mpi4py' in result.stdout
    assert 'pip install "cpubn[mpi]"' in result.stdout


@pytest.fixture
def collectives(monkeypatch):
    """The list of exchanges SyncBatchNorm makes (their row length each)."""
    import cpubn._layers.sync as sync_module
    calls = []
    real = sync_module.allgather_rows

    def counting(comm, row):
        calls.append(row.size)
        return real(comm, row)

    monkeypatch.setattr(sync_module, "allgather_rows", counting)
    return calls


@needs_mpi4py
@pytest.mark.parametrize("axis, shape", [(1, (6, 5, 4, 3)), (-1, (6, 4, 3, 5)), (1, (9, 5))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fused", [False, True])
def test_one_process_is_batchnorm(axis, shape, dtype, fused, rng, collectives):
    """With one process the statistics are the local ones: y, running statistics and
    parameter gradients are BatchNorm's bits; dx is computed differently (two passes)
    and agrees to rounding."""
    activation = "relu" if fused else None
    bn = cpubn.BatchNorm(5, axis=axis, activation=activation)
    sync = cpubn.SyncBatchNorm(5, axis=axis, activation=activation)
    assert collectives == [8 + 7]          # construction: the configurations compared
    bn.weight[...] = sync.weight[...] = rng.uniform(0.5, 1.5, 5)
    bn.bias[...] = sync.bias[...] = rng.uniform(-1, 1, 5)
    for step in range(2):
        x = make_x(rng, shape, dtype, axis, loc=1e3)
        residual = rng.standard_normal(shape).astype(dtype) if fused else None
        x_copy = x.copy()
        y = sync(x, residual=residual)
        assert bitwise_equal(y, bn(x, residual=residual))
        dy = rng.standard_normal(shape).astype(dtype)
        got, expected = sync.backward(dy), bn.backward(dy)
        if fused:
            assert bitwise_equal(got[1], expected[1])
            got, expected = got[0], expected[0]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=0, atol=scale * 4 * np.finfo(dtype).eps)
        assert bitwise_equal(x, x_copy)
        for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
            assert bitwise_equal(getattr(sync, name), getattr(bn, name)), name
    # One exchange per training forward and per backward, of header + 2C doubles.
    assert collectives[1:] == [7 + 10] * 4
    sync.eval()
    bn.eval()
    x = make_x(rng, shape, dtype, axis)
    y_sync, y_bn = sync(x), bn(x)       # held: in eval, backward needs them (the ReLU mask)
    assert bitwise_equal(y_sync, y_bn)
    sync.backward(np.ones_like(x))
    assert len(collectives) == 5            # eval mode communicates nothing


@needs_mpi4py
def test_one_process_half_precision(rng):
    """float16: y and dx within one unit in the last place of BatchNorm's (the kernels
    read half-precision data's statistics as float32; dx is computed in float32 and
    rounded once); the running statistics are BatchNorm's bits."""
    x = make_x(rng, (16, 6, 5, 5), np.float32).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    bn, sync = cpubn.BatchNorm(6), cpubn.SyncBatchNorm(6)
    for got, expected in ((sync(x), bn(x)), (sync.backward(dy), bn.backward(dy))):
        got, expected = got.astype(np.float64), expected.astype(np.float64)
        ulp = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float64)
        assert (np.abs(got - expected) <= ulp).all()
    assert bitwise_equal(sync.running_var, bn.running_var)


@needs_mpi4py
def test_out_and_in_place(rng):
    x = make_x(rng, (8, 3, 5), np.float32)
    expected = cpubn.BatchNorm(3)(x)
    out = np.empty_like(x)
    sync = cpubn.SyncBatchNorm(3)
    assert sync(x, out) is out and bitwise_equal(out, expected)
    dx = sync.backward(np.ones_like(x), out=np.empty_like(x))
    assert dx.shape == x.shape
    x_inplace = x.copy()
    assert sync(x_inplace, out=x_inplace) is x_inplace
    assert bitwise_equal(x_inplace, expected)
    with pytest.raises(ValueError, match="in-place forward"):
        sync.backward(np.ones_like(x))


@needs_mpi4py
def test_empty_slice_in_one_process():
    sync = cpubn.SyncBatchNorm(3)
    snapshot = sync.state_dict()
    with pytest.raises(ValueError, match="got 0 in the global batch"):
        sync(np.empty((0, 3, 4), np.float32))
    for key, value in sync.state_dict().items():
        assert bitwise_equal(value, snapshot[key])
    with pytest.raises(ValueError, match="features"):
        sync(np.empty((0, 2, 4), np.float32))
    sync.eval()
    y = sync(np.empty((0, 3, 4), np.float32))      # eval: an empty slice is just empty
    assert y.shape == (0, 3, 4) and sync.backward(np.empty_like(y)).shape == (0, 3, 4)


@needs_mpi4py
def test_state_repr_save_load(tmp_path, rng):
    sync = cpubn.SyncBatchNorm(4, momentum=None, axis=-1, dtype=np.float64)
    sync(make_x(rng, (6, 4), np.float64, -1))
    assert repr(sync) == ("SyncBatchNorm(4, eps=1e-05, momentum=None, affine=True, "
                          "track_running_stats=True, axis=-1, comm=MPI_COMM_WORLD(size=1))")
    sync.save(tmp_path / "sync.npz")
    loaded = cpubn.SyncBatchNorm.load(tmp_path / "sync.npz", comm=MPI.COMM_SELF)
    assert type(loaded) is cpubn.SyncBatchNorm and loaded.comm is MPI.COMM_SELF
    assert loaded.training and loaded.momentum is None and loaded.dtype == np.float64
    for key, value in sync.state_dict().items():
        assert bitwise_equal(loaded.state_dict()[key], value)
    assert [p.shape for p, g in sync.parameters()] == [(4,), (4,)]
    bn = cpubn.BatchNorm(4, axis=-1)
    bn(make_x(rng, (6, 4), np.float32, -1))
    bn.save(tmp_path / "bn.npz")
    converted = cpubn.SyncBatchNorm.load(tmp_path / "bn.npz")
    assert type(converted) is cpubn.SyncBatchNorm and converted.num_batches_tracked == 1
    assert bitwise_equal(converted.running_var, bn.running_var)
    with pytest.raises(ValueError, match="SyncBatchNorm.load"):
        cpubn.BatchNorm.load(tmp_path / "sync.npz")


@needs_mpi4py
def test_convert_sync_batchnorm(rng):
    lazy = cpubn.LazyBatchNorm(activation="relu")
    lazy(make_x(rng, (5, 3), np.float32))
    lazy.eval()
    sync = cpubn.SyncBatchNorm.convert_sync_batchnorm(lazy, comm=MPI.COMM_SELF)
    assert (sync.num_features, sync.activation, sync.training) == (3, "relu", False)
    for key, value in lazy.state_dict().items():
        assert bitwise_equal(sync.state_dict()[key], value)
    with pytest.raises(TypeError, match="convert_sync_batchnorm"):
        cpubn.SyncBatchNorm.convert_sync_batchnorm(cpubn.LazyBatchNorm())
    with pytest.raises(TypeError, match="convert_sync_batchnorm"):
        cpubn.SyncBatchNorm.convert_sync_batchnorm("not a layer")


@needs_mpi4py
def test_bad_arguments():
    with pytest.raises(TypeError, match="intra-communicator"):
        cpubn.SyncBatchNorm(3, comm="world")
    with pytest.raises(ValueError, match="eps"):
        cpubn.SyncBatchNorm(3, eps=float("nan"))

"""Run under mpiexec by tests/layers/test_sync.py: every process checks its SyncBatchNorm against
a single-process BatchNorm on the concatenated global batch and the float64 reference.

    mpiexec -n 3 python -m mpi4py tests/mpi_sync_cases.py

Every process builds the same global data from the same seed and takes its slice along
axis 0 (the batch axis).  A failed check raises; under ``python -m mpi4py`` that aborts
the whole job, so the test sees a non-zero exit status.  The last line of each process
is "rank R: N checks ok".
"""
import os
import sys

# The shared test helpers (reference.py, bn_testing.py) sit one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import cpubn  # noqa: E402
import reference as ref  # noqa: E402
from bn_testing import assert_close, bitwise_equal, make_x  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
REPORT_DIR = os.environ.get("CPUBN_MPI_REPORT_DIR")
C = 5
checks = 0


def batch_sizes(total, split, size):
    """Per-process batch sizes: even, uneven (one process may get a single sample) or
    with process 1 (the last one) getting none."""
    if split == "even":
        sizes = [total // size + (r < total % size) for r in range(size)]
    elif split == "uneven":
        weights = np.arange(1, size + 1) ** 2
        sizes = np.floor(weights / weights.sum() * total).astype(int).tolist()
        sizes[-1] += total - sum(sizes)
    else:
        sizes = [total // (size - 1)] * size
        sizes[min(1, size - 1)] = 0
        sizes[-1 if size > 2 else 0] += total - sum(sizes)
    assert sum(sizes) == total and min(sizes) >= 0
    return sizes


def local_part(a, sizes, rank=RANK):
    start = sum(sizes[:rank])
    return a[start:start + sizes[rank]]


def check(condition, what):
    global checks
    if not condition:
        raise AssertionError(f"rank {RANK}: {what}")
    checks += 1


def close(got, expected, dtype, kind, what):
    global checks
    assert_close(got, expected, dtype, kind, f"rank {RANK}: {what}")
    checks += 1


def same_on_all_processes(array, comm=COMM):
    """True when array has the same bits on every process of comm."""
    mine = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)
    table = np.empty((comm.Get_size(), mine.size), np.uint8)
    comm.Allgather(mine, table)
    return all(bitwise_equal(row, table[0]) for row in table)


def rank_order_sum(array, comm=COMM):
    table = np.empty((comm.Get_size(),) + array.shape, array.dtype)
    comm.Allgather(np.ascontiguousarray(array), table)
    total = table[0].astype(np.float64)
    for row in table[1:]:
        total += row
    return total


def shape_of(layout, n):
    return {"nchw": (n, C, 3, 4), "nhwc": (n, 3, 4, C), "rows": (n, C)}[layout]


def axis_of(layout):
    return -1 if layout == "nhwc" else 1


def training_steps(dtype, layout, split, fused, steps=3, comm=COMM):
    """Several training steps (forward, backward, SGD on the parameters with summed
    gradients), then an eval forward: SyncBatchNorm against one BatchNorm on the global
    batch and the float64 reference."""
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng([7, len(layout), len(split), np.dtype(dtype).itemsize,
                                 fused, size])
    axis = axis_of(layout)
    activation = "relu" if fused else None
    single = cpubn.BatchNorm(C, axis=axis, activation=activation)
    sync = cpubn.SyncBatchNorm(C, axis=axis, activation=activation, comm=comm)
    what = f"{np.dtype(dtype).name} {layout} {split} fused={fused} size={size}"
    for step in range(steps):
        total = int(rng.integers(7, 13))
        sizes = batch_sizes(total, split, size)
        x = make_x(rng, shape_of(layout, total), dtype, axis)
        dy = rng.standard_normal(x.shape).astype(dtype)
        residual = rng.standard_normal(x.shape).astype(dtype) if fused else None
        x_local, dy_local = local_part(x, sizes, rank), local_part(dy, sizes, rank)
        r_local = None if residual is None else local_part(residual, sizes, rank)
        mean, var, count = ref.batch_stats(x, axis)
        invstd = ref.invstd_of(var, 1e-5)

        y_single = single(x, residual=residual)
        y_sync = sync(x_local, residual=r_local)
        check(y_sync.shape == x_local.shape and y_sync.dtype == x.dtype, f"{what}: y shape")
        close(y_sync, local_part(y_single, sizes, rank), dtype, "value", f"{what}: y vs single")
        y_ref = ref.normalize(x, mean, invstd, single.weight, single.bias, axis)
        if fused:
            y_ref = np.maximum(y_ref + residual, 0)
        close(y_sync, local_part(y_ref, sizes, rank), dtype, "value", f"{what}: y vs reference")

        single.zero_grad()
        sync.zero_grad()
        g_single = single.backward(dy)
        g_sync = sync.backward(dy_local)
        if fused:
            (dx_single, dr_single), (dx_sync, dr_sync) = g_single, g_sync
            close(dr_sync, local_part(dr_single, sizes, rank), dtype, "grad",
                  f"{what}: dresidual")
            mask = y_single > 0
            g = np.where(mask, dy, 0)
        else:
            dx_single, dx_sync, g = g_single, g_sync, dy
        close(dx_sync, local_part(dx_single, sizes, rank), dtype, "grad", f"{what}: dx vs single")
        dx_ref, dw_ref, db_ref = ref.backward(g, x, mean, invstd, single.weight, True, axis)
        close(dx_sync, local_part(dx_ref, sizes, rank), dtype, "grad", f"{what}: dx vs reference")
        grad_weight = rank_order_sum(sync.grad_weight, comm)
        grad_bias = rank_order_sum(sync.grad_bias, comm)
        close(grad_weight, dw_ref, np.float32, "grad", f"{what}: summed grad_weight")
        close(grad_bias, db_ref, np.float32, "grad", f"{what}: summed grad_bias")
        close(grad_weight, single.grad_weight, np.float32, "grad", f"{what}: vs single dw")

        # One SGD step with the summed gradients, on both: identical parameters everywhere.
        sync.weight -= 0.1 * grad_weight.astype(sync.weight.dtype)
        sync.bias -= 0.1 * grad_bias.astype(sync.bias.dtype)
        single.weight[...] = sync.weight
        single.bias[...] = sync.bias

        for name in ("running_mean", "running_var"):
            check(same_on_all_processes(getattr(sync, name), comm),
                  f"{what}: {name} differs across processes")
            close(getattr(sync, name), getattr(single, name), np.float32, "stat",
                  f"{what}: {name} vs single")
        check(sync.num_batches_tracked == single.num_batches_tracked == step + 1,
              f"{what}: num_batches_tracked")

    sync.eval()
    single.eval()
    x = make_x(rng, shape_of(layout, 4), dtype, axis)
    y_sync, y_single = sync(x), single(x)   # held: eval backward needs them (ReLU mask)
    close(y_sync, y_single, dtype, "value", f"{what}: eval forward")
    dy = rng.standard_normal(x.shape).astype(dtype)
    close(sync.backward(dy), single.backward(dy), dtype, "grad", f"{what}: eval backward")


def offset_accuracy(layout):
    """float32 channels at offset 1e4: within 1e-5 of the float64 reference of the
    global batch."""
    rng = np.random.default_rng([11, len(layout), SIZE])
    axis = axis_of(layout)
    total = 6 * SIZE + 1
    sizes = batch_sizes(total, "uneven", SIZE)
    x = (rng.standard_normal(shape_of(layout, total)) + 1e4).astype(np.float32)
    y = cpubn.SyncBatchNorm(C, axis=axis)(local_part(x, sizes))
    mean, var, _ = ref.batch_stats(x, axis)
    y_ref = ref.normalize(x, mean, ref.invstd_of(var, 1e-5), axis=axis)
    error = float(np.abs(y - local_part(y_ref, sizes)).max()) if y.size else 0.0
    check(error <= 1e-5, f"offset 1e4 {layout}: max abs error {error:.2e}")


def converted():
    """convert_sync_batchnorm carries the state and mode, and continues as BatchNorm
    would on the global batch."""
    rng = np.random.default_rng([13, SIZE])
    bn = cpubn.BatchNorm(C, momentum=None, activation="relu")
    bn.weight[...] = rng.uniform(0.5, 1.5, C)
    bn(make_x(rng, (8, C, 3), np.float32))
    sync = cpubn.SyncBatchNorm.convert_sync_batchnorm(bn)
    check(type(sync) is cpubn.SyncBatchNorm and sync.training and sync.momentum is None
          and sync.activation == "relu", "converted hyperparameters")
    for key, value in bn.state_dict().items():
        check(bitwise_equal(sync.state_dict()[key], value), f"converted {key}")
    layers = cpubn.SyncBatchNorm.convert_sync_batchnorm([bn, "not a layer"])
    check(isinstance(layers[0], cpubn.SyncBatchNorm) and layers[1] == "not a layer",
          "converted list")
    sizes = batch_sizes(9, "uneven", SIZE)
    x = make_x(rng, (9, C, 3), np.float32)
    close(sync(local_part(x, sizes)), local_part(bn(x), sizes), np.float32, "value",
          "converted: forward")
    close(sync.running_var, bn.running_var, np.float32, "stat", "converted: running_var")
    check(sync.num_batches_tracked == bn.num_batches_tracked == 2, "converted: count")
    bn.eval()
    check(cpubn.SyncBatchNorm.convert_sync_batchnorm(bn).training is False, "converted: eval")


def sub_communicators():
    """comm.Split: each group normalizes over its own members' batches."""
    color = RANK % 2
    group = COMM.Split(color, RANK)
    training_steps(np.float32, "nchw", "uneven", False, steps=2, comm=group)
    group.Free()


def local_eval_statistics():
    """track_running_stats=False in eval mode: local batch statistics, no exchange."""
    rng = np.random.default_rng([17, RANK])    # different data on every process
    x = make_x(rng, (3 + RANK, C), np.float64)
    sync = cpubn.SyncBatchNorm(C, track_running_stats=False).eval()
    local = cpubn.BatchNorm(C, track_running_stats=False).eval()
    check(bitwise_equal(sync(x), local(x)), "eval with batch statistics is local")


def without_affine_or_running_stats():
    """affine=False and track_running_stats=False: still the global batch's statistics in
    training (exchanged), and dx through them."""
    rng = np.random.default_rng([23, SIZE])
    sizes = batch_sizes(11, "empty", SIZE)
    x = make_x(rng, (11, C, 3), np.float64)
    dy = rng.standard_normal(x.shape)
    single = cpubn.BatchNorm(C, affine=False, track_running_stats=False, dtype=np.float64)
    sync = cpubn.SyncBatchNorm(C, affine=False, track_running_stats=False, dtype=np.float64)
    close(sync(local_part(x, sizes)), local_part(single(x), sizes), np.float64, "value",
          "no affine: y")
    close(sync.backward(local_part(dy, sizes)), local_part(single.backward(dy), sizes),
          np.float64, "grad", "no affine: dx")
    check(sync.running_mean is None and sync.grad_weight is None, "no affine: no state")


def half_precision():
    """float16 data: y and dx against one BatchNorm on the global batch, to float16's
    precision (about 1e-3 relative)."""
    rng = np.random.default_rng([19, SIZE])
    sizes = batch_sizes(10, "uneven", SIZE)
    x = make_x(rng, (10, C, 4), np.float32).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    single, sync = cpubn.BatchNorm(C), cpubn.SyncBatchNorm(C)
    y = sync(local_part(x, sizes))
    check(y.dtype == np.float16, "float16 output dtype")
    for got, expected, what in ((y, single(x), "y"),
                                (sync.backward(local_part(dy, sizes)), single.backward(dy),
                                 "dx")):
        expected = local_part(expected, sizes).astype(np.float64)
        check(np.allclose(got.astype(np.float64), expected, rtol=2e-3, atol=2e-3),
              f"float16 {what}")


def report(text):
    """A line of this process's report: printed, and appended to REPORT_DIR/rank<R>.txt
    when that is set (the processes' stdout may interleave)."""
    print(f"rank {RANK}: {text}", flush=True)
    if REPORT_DIR:
        with open(os.path.join(REPORT_DIR, f"rank{RANK}.txt"), "a") as file:
            file.write(text + "\n")


def main():
    for dtype in (np.float32, np.float64):
        for layout in ("nchw", "nhwc", "rows"):
            for split in ("even", "uneven", "empty"):
                training_steps(dtype, layout, split, fused=False)
    for layout in ("nchw", "nhwc"):
        training_steps(np.float32, layout, "empty", fused=True)
        offset_accuracy(layout)
    converted()
    sub_communicators()
    local_eval_statistics()
    without_affine_or_running_stats()
    half_precision()
    report(f"{checks} checks ok")


if __name__ == "__main__":
    main()

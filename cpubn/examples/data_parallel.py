"""Data-parallel training with cpubn.SyncBatchNorm: the digits MLP of the paper example,
each process holding a slice of every mini-batch.

    mpiexec -n 4 python -m mpi4py -m cpubn.examples.data_parallel     # 4 processes
    mpiexec -n 4 python -m cpubn.examples.data_parallel               # the same
    python -m cpubn.examples.data_parallel                            # 1 process

Every process builds the same network from the same seed and draws the same global
mini-batches (60 images); process r trains on its part of each batch (15 of 60 with 4
processes).  After the backward pass the parameter gradients, BatchNorm's included, are
summed over the processes with one ``Allreduce``: each process scales its loss gradient
by its share of the batch, so the sum is the gradient of the global batch's mean loss.
Three runs, all from the same initial weights and batches, printed per epoch:

* one process training on the whole batch with ``BatchNorm`` (computed by process 0);
* every process with ``SyncBatchNorm``: the same training, to float rounding;
* every process with a plain ``BatchNorm``: each normalizes its own 4x smaller slice,
  which changes the model (and its running statistics differ between processes).

``python -m mpi4py`` makes an uncaught error on any process abort the whole job instead
of leaving the others waiting.  Needs ``pip install "cpubn[mpi,examples]"``.
"""
import argparse
import sys
import time

import numpy as np

import cpubn
from cpubn.examples import nn
from cpubn.examples.data import load_digits_split, minibatches
from cpubn.examples.paper_mnist import BATCH_SIZE, HIDDEN_LAYERS, HIDDEN_UNITS, INIT_STD

LEARNING_RATE = 0.5


def build_network(norm, rng):
    """64 -> 3 x (Linear -> norm -> Sigmoid) -> Linear -> 10, as in paper_mnist; norm is
    None (the process-0 reference builds BatchNorm) or a factory of normalization layers."""
    layers, fan_in = [], 64
    for _ in range(HIDDEN_LAYERS):
        layers.append(nn.Linear(fan_in, HIDDEN_UNITS, rng, INIT_STD, bias=False))
        layers.append(norm(HIDDEN_UNITS))
        layers.append(nn.Sigmoid())
        fan_in = HIDDEN_UNITS
    layers.append(nn.Linear(fan_in, 10, rng, INIT_STD))
    return layers


def flat_gradients(layers):
    return np.concatenate([grad.ravel() for layer in layers
                           for _, grad in nn.parameters(layer)])


def set_gradients(layers, flat):
    start = 0
    for layer in layers:
        for _, grad in nn.parameters(layer):
            grad[...] = flat[start:start + grad.size].reshape(grad.shape)
            start += grad.size


def flat_parameters(layers):
    return np.concatenate([param.ravel() for layer in layers
                           for param, _ in nn.parameters(layer)])


class Run:
    """One training run: its network, the processes it spans, and its per-epoch record."""

    def __init__(self, name, layers, comm, rank, size):
        self.name, self.layers = name, layers
        self.comm, self.rank, self.size = comm, rank, size      # comm None: one process
        self.loss, self.accuracy = [], []
        self._loss_sum = 0.0

    def step(self, x, labels, batch_size, learning_rate):
        """Forward and backward on this process's part of a batch of batch_size, sum the
        gradients over the processes, SGD."""
        logits = nn.forward(self.layers, x)
        loss, dlogits = nn.softmax_cross_entropy(logits, labels)
        share = len(labels) / batch_size          # this process's part of the mean loss
        self._loss_sum += loss * share
        nn.backward(self.layers, dlogits * np.float32(share))
        if self.comm is not None:
            from mpi4py import MPI
            gradients = flat_gradients(self.layers)
            self.comm.Allreduce(MPI.IN_PLACE, gradients, op=MPI.SUM)
            set_gradients(self.layers, gradients)
        nn.sgd_step(self.layers, learning_rate)   # also clears the gradients

    def end_epoch(self, steps, data):
        loss = self._loss_sum
        if self.comm is not None:
            loss = self.comm.allreduce(loss)
        self.loss.append(loss / steps)
        self._loss_sum = 0.0
        accuracy = np.mean(nn.predict(self.layers, data.x_test) == data.y_test)
        self.accuracy.append(float(accuracy))


def train(args, data, comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    init = np.random.default_rng(args.seed)
    state = init.bit_generator.state

    def fresh(norm):
        init.bit_generator.state = state          # the same initial weights for every run
        return build_network(norm, init)

    processes = f"{size} process{'es' if size > 1 else ''}"
    runs = [Run(f"{processes}, SyncBatchNorm",
                fresh(lambda c: cpubn.SyncBatchNorm(c, comm=comm)), comm, rank, size),
            Run(f"{processes}, BatchNorm per process", fresh(cpubn.BatchNorm), comm,
                rank, size)]
    if rank == 0:
        runs.insert(0, Run("1 process, BatchNorm", fresh(cpubn.BatchNorm), None, 0, 1))
    batches = minibatches(len(data.x_train), args.batch, np.random.default_rng(args.seed + 1))
    steps_per_epoch = len(data.x_train) // args.batch
    weight_gap = []
    for epoch in range(args.epochs):
        for _ in range(steps_per_epoch):
            batch = next(batches)
            part = np.array_split(batch, size)[rank]
            for run in runs:
                if run.comm is None:
                    run.step(data.x_train[batch], data.y_train[batch], len(batch), args.lr)
                else:
                    run.step(data.x_train[part], data.y_train[part], len(batch), args.lr)
        for run in runs:
            run.end_epoch(steps_per_epoch, data)
        if rank == 0:
            weight_gap.append(float(np.abs(flat_parameters(runs[0].layers)
                                           - flat_parameters(runs[1].layers)).max()))
            print_epoch(runs, epoch, weight_gap[-1], epoch == 0)
    # Are the data-parallel models the same on every process?  Parameters (summed
    # gradients) and SyncBatchNorm's running statistics should be; per-process
    # BatchNorm's running statistics are not.
    checks = {}
    for run in runs[-2:]:
        mine = np.concatenate([flat_parameters(run.layers)] + [
            np.concatenate((layer.running_mean, layer.running_var))
            for layer in run.layers if isinstance(layer, cpubn.BatchNorm)])
        table = np.empty((size, mine.size), mine.dtype)
        comm.Allgather(mine, table)
        checks[run.name] = float(np.abs(table - table[0]).max())
    if rank == 0:
        print_summary(runs, weight_gap, checks)
    return runs


def print_epoch(runs, epoch, gap, header):
    if header:
        names = "".join(f" | {run.name:^26}" for run in runs)
        print(f"{'':5}{names}")
        cells = " | " + " | ".join(f"{'loss':>9} {'test acc':>9}{'':6}" for _ in runs)
        print(f"{'epoch':5}{cells}   max |weight diff| (sync vs 1 process)")
    cells = " | " + " | ".join(f"{run.loss[-1]:9.5f} {run.accuracy[-1]:9.4f}{'':6}"
                               for run in runs)
    print(f"{epoch + 1:5}{cells}   {gap:.1e}", flush=True)


def print_summary(runs, weight_gap, checks):
    single, sync, local = runs
    loss_gap = max(abs(a - b) for a, b in zip(single.loss, sync.loss))
    print()
    print(f"SyncBatchNorm against one process on the whole batch: loss within {loss_gap:.1e}, "
          f"weights within {max(weight_gap):.1e}, test accuracy "
          f"{sync.accuracy[-1]:.4f} vs {single.accuracy[-1]:.4f}")
    print(f"BatchNorm per process ({sync.size}x smaller batches): final loss "
          f"{local.loss[-1]:.5f} vs {single.loss[-1]:.5f}, test accuracy "
          f"{local.accuracy[-1]:.4f} (process 0's running statistics)")
    for name, gap in checks.items():
        print(f"{name}: parameters and running statistics differ across processes by up to "
              f"{gap:.1e}")


def _parser():
    parser = argparse.ArgumentParser(
        prog="mpiexec -n 4 python -m mpi4py -m cpubn.examples.data_parallel",
        description="Data-parallel training of the digits MLP with cpubn.SyncBatchNorm, "
                    "against one process on the whole batch and per-process BatchNorm.")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (default 5)")
    parser.add_argument("--batch", type=int, default=BATCH_SIZE,
                        help=f"global mini-batch size (default {BATCH_SIZE})")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE,
                        help=f"SGD learning rate (default {LEARNING_RATE})")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch order")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        from mpi4py import MPI
    except ImportError:
        print(f"error: {cpubn._layers.sync.INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        data = load_digits_split("flat")
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    comm = MPI.COMM_WORLD
    if args.batch < comm.Get_size() or args.epochs < 1:
        print("error: --batch must be at least the number of processes and --epochs >= 1",
              file=sys.stderr)
        return 2
    if comm.Get_rank() == 0:
        per = f"{args.batch // comm.Get_size()}" + (
            "" if args.batch % comm.Get_size() == 0 else f"-{-(-args.batch // comm.Get_size())}")
        print(f"cpubn {cpubn.__version__} data-parallel digits MLP (3x100 sigmoid, BatchNorm "
              f"before each): {comm.Get_size()} processes, global batch {args.batch} "
              f"({per} per process), SGD lr {args.lr:g}, seed {args.seed}, "
              f"{len(data.x_train)} train / {len(data.x_test)} test images")
        if comm.Get_size() == 1:
            print("(one process: run it under mpiexec -n 4 to split the batches)")
    start = time.perf_counter()
    with nn.single_threaded_blas():
        train(args, data, comm)
    if comm.Get_rank() == 0:
        print(f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

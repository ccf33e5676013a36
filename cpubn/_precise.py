"""precise_statistics: exact population statistics for normalization layers ("PreciseBN",
Wu & Johnson, 2021).

Running averages trail a model whose weights are still moving; recomputing each layer's
statistics over a number of batches with the final weights closes the train/inference
gap.  Inside the block every layer runs in training mode, and the statistics each
training forward reports to its running-statistics hook (``_track_batch(saved, count)``:
the batch's mean and biased variance over ``count`` values per channel; global ones for a
SyncBatchNorm) are merged exactly instead of being averaged in.
"""
import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._module import BatchNorm

_FLOAT64 = np.dtype(np.float64)


class _PopulationStatistics:
    """(count, mean, M2) per channel in float64, merged batch by batch with Chan et al.'s
    pairwise update: exact for any sequence of batch sizes (no E[x^2] - E[x]^2)."""

    def __init__(self, layer: BatchNorm) -> None:
        self.layer = layer
        self.count = 0
        self.mean: NDArray[np.float64] | None = None
        self.m2: NDArray[np.float64] | None = None
        self.batches = 0

    def add(self, saved: Any, count: int) -> None:
        """The _track_batch hook: one training forward's statistics."""
        # A SyncBatchNorm's statistics are those of the global batch: its own _track_batch
        # replaces the local count that BatchNorm.forward passes by the global count of
        # its last exchange, kept in _sync_count; this hook must do the same.
        count = getattr(self.layer, "_sync_count", None) or count
        batch_mean = np.array(saved.mean, dtype=_FLOAT64)
        batch_m2 = np.array(saved.batch_var, dtype=_FLOAT64) * count
        if self.mean is None:
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            total = self.count + count
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + batch_m2 + delta * delta * (self.count * count / total)
        self.count += count
        self.batches += 1

    @property
    def unbiased_var(self) -> NDArray[np.float64]:
        # (read only after a batch: m2 is an array)
        return self.m2 / (self.count - 1)  # type: ignore[operator, return-value]


@contextlib.contextmanager
def precise_statistics(layers: Iterable[BatchNorm]) -> Iterator[None]:
    """``with cpubn.precise_statistics(layers): ...`` replaces the layers' running
    statistics by the exact statistics of the data they see inside the block.

    ``layers``: an iterable of cpubn normalization layers (BatchNorm and its subclasses:
    BatchRenorm, GhostBatchNorm, SyncBatchNorm, LazyBatchNorm) with running statistics;
    anything else in it is a TypeError, a layer without running statistics a ValueError.
    Inside the block the layers are in training mode (they normalize with batch
    statistics as usual) and their running statistics do not change.  On a normal exit,
    for each layer that ran at least one forward:

    * ``running_mean`` / ``running_var`` are the mean and unbiased variance of everything
      it saw in the block, as if it had been one batch (merged exactly, in float64);
    * ``num_batches_tracked`` has grown by the number of its forwards;

    and every layer is back in the mode it had before.  A layer that ran no forward keeps
    its statistics.  If the block raises, statistics, counters and modes are left exactly
    as they were.  Blocks over the same layer cannot be nested.

    Run the forwards on training data with the final weights (no backward needed), e.g.
    100 batches: the statistics are then the model's, not a trailing average's.
    """
    unique: dict[int, BatchNorm] = {}
    for layer in list(layers):
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"precise_statistics takes cpubn normalization layers, got "
                            f"{type(layer).__name__}")
        if not layer.track_running_stats:
            raise ValueError(f"{layer!r} has no running statistics (track_running_stats="
                             f"False)")
        if "_track_batch" in vars(layer):
            raise ValueError(f"{layer!r} is already inside a precise_statistics block")
        unique[id(layer)] = layer
    distinct = list(unique.values())
    modes = [layer.training for layer in distinct]
    accumulators = [_PopulationStatistics(layer) for layer in distinct]
    try:
        for layer, accumulator in zip(distinct, accumulators):
            # An instance attribute shadows the class's hook (BatchNorm's or a subclass's
            # override) for this object only; deleting it restores the class's.
            layer._track_batch = accumulator.add  # type: ignore[method-assign]
            layer.train()
        yield
    finally:
        for layer, mode in zip(distinct, modes):
            vars(layer).pop("_track_batch", None)
            layer.train(mode)
    for layer, accumulator in zip(distinct, accumulators):
        if accumulator.batches:
            layer.running_mean[...] = accumulator.mean
            layer.running_var[...] = accumulator.unbiased_var
            # (an int: track_running_stats was checked)
            layer.num_batches_tracked += accumulator.batches    # type: ignore[operator]

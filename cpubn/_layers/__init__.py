"""The layers: objects that hold parameters and running statistics, built on cpubn._core."""
from .batchnorm import BatchNorm
from .grad_mode import no_grad
from .lazy import LazyBatchNorm
from .small_batch import BatchRenorm, GhostBatchNorm, precise_statistics, renorm_schedule
from .sync import SyncBatchNorm

__all__ = ["BatchNorm", "LazyBatchNorm", "SyncBatchNorm", "BatchRenorm", "GhostBatchNorm",
           "precise_statistics", "renorm_schedule", "no_grad"]

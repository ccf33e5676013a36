"""LazyBatchNorm: a BatchNorm whose num_features comes from the first input it sees."""
import contextlib
import os
from collections.abc import Collection, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .batchnorm import BatchNorm
from .._core.validation import check_batch_stats_possible, check_data

# The attributes whose size depends on num_features: absent (None) until materialized.
_PER_CHANNEL = ("weight", "bias", "grad_weight", "grad_bias", "running_mean", "running_var")

_Lazy = TypeVar("_Lazy", bound="LazyBatchNorm")


class LazyBatchNorm(BatchNorm):
    """A BatchNorm that infers ``num_features`` from the first input, like PyTorch's
    ``torch.nn.LazyBatchNorm1d/2d/3d``.

    ``LazyBatchNorm(axis=1)`` takes ``num_features = x.shape[axis]`` from the first
    ``forward(x)`` (or the first ``load_state_dict``); from then on it *is* a
    ``BatchNorm(num_features, ...)`` with the same hyperparameters (parameters 1 / 0,
    running statistics 0 / 1, same results, same repr).  The hyperparameters are checked at
    construction (by keyword only, so that a stray ``LazyBatchNorm(64)`` is an error
    rather than ``eps=64``); the first input is checked completely before anything is
    created, so a first call that raises leaves the layer unmaterialized and ready for a
    good input.

    Before materialization (``has_uninitialized_params()`` is True):

    * ``num_features``, ``weight``, ``bias``, ``grad_weight``, ``grad_bias``,
      ``running_mean`` and ``running_var`` are None; ``num_batches_tracked`` is 0 (None
      without running statistics); ``train()`` / ``eval()`` work and are kept.
    * ``load_state_dict(sd)`` infers num_features from the length of sd's per-channel
      entries, then loads as BatchNorm does (a failed load leaves the layer unmaterialized).
    * ``state_dict()`` and ``save()`` raise ValueError: there are no arrays to report yet
      (an ``affine=False, track_running_stats=False`` layer has no state, so its
      ``state_dict()`` is ``{}``).  ``backward()`` raises ValueError as it does for any
      BatchNorm before a forward.  ``zero_grad()``, ``reset_parameters()`` and
      ``reset_running_stats()`` have nothing to reset and do nothing.
    * ``cpubn.fold_into_*`` refuse it.
    """

    # None until materialized (BatchNorm's is always an int).
    num_features: int | None  # type: ignore[assignment]

    def __init__(self, *, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, axis: int = 1,
                 dtype: DTypeLike = np.float32, activation: str | None = None) -> None:
        # Keyword-only, unlike torch: LazyBatchNorm(64), written for BatchNorm(64), would
        # otherwise silently mean eps=64.
        # BatchNorm's constructor validates the hyperparameters; the one-channel state it
        # allocates is then dropped, so both classes accept and reject the same values.
        super().__init__(1, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=axis, dtype=dtype,
                         activation=activation)
        self.num_features = None
        for name in _PER_CHANNEL:
            setattr(self, name, None)

    def has_uninitialized_params(self) -> bool:
        """True until num_features is known (PyTorch's name for the same question)."""
        return self.num_features is None

    # ------------------------------------------------------------------ materialization
    def _materialize(self, num_features: int) -> None:
        """Become BatchNorm(num_features) with the current hyperparameters and mode.
        Running BatchNorm's own constructor (on BatchNorm's own config) keeps the two
        classes' state identical whatever BatchNorm grows."""
        config = dict(self._config(), num_features=num_features)
        training, count = self.training, self.num_batches_tracked
        BatchNorm.__init__(self, **config)
        self.training, self.num_batches_tracked = training, count

    @contextlib.contextmanager
    def _unmaterialized_on_error(self) -> Iterator[None]:
        """Materialize inside this block; if the block raises, undo it.  Materializing
        only rebinds attributes, so a shallow copy of __dict__ restores the layer."""
        before = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _require_materialized(self, action: str) -> None:
        if self.num_features is None:
            raise ValueError(f"{action}: {self!r} has not inferred num_features yet (call "
                             f"it on an input or load a state dict first)")

    # ------------------------------------------------------------------ BatchNorm API
    def forward(self, x: ArrayLike, *args: Any, **kwargs: Any) -> NDArray[Any]:
        if self.num_features is None:
            data, axis = check_data(x, self.axis)
            if (self.training or not self.track_running_stats) and data.size:
                check_batch_stats_possible(data, axis)
            # Checks of the other arguments (out, ...) run inside BatchNorm.forward; if
            # they fail, the layer goes back to unmaterialized.
            with self._unmaterialized_on_error():
                self._materialize(data.shape[axis])
                return super().forward(data, *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    forward.__doc__ = BatchNorm.forward.__doc__

    def zero_grad(self) -> None:
        """Set grad_weight and grad_bias to zero (nothing to do before materialization)."""
        if self.num_features is not None:
            super().zero_grad()

    def reset_running_stats(self) -> None:
        """Running mean to 0, running variance to 1, num_batches_tracked to 0 (before
        materialization: only num_batches_tracked)."""
        if self.num_features is not None:
            super().reset_running_stats()
        elif self.track_running_stats:
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Running statistics to 0 / 1, weight to 1, bias to 0 (before materialization:
        only num_batches_tracked)."""
        if self.num_features is not None:
            super().reset_parameters()
        else:
            self.reset_running_stats()

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the state under PyTorch's key names; raises ValueError before
        materialization (unless the layer has no state: then ``{}``)."""
        if self.num_features is None and self._state_keys():
            self._require_materialized("state_dict()")
        return super().state_dict()

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None:
        """Load a state dict as BatchNorm does; before materialization, num_features is
        first inferred from the length of its per-channel entries."""
        if self.num_features is not None:
            return super().load_state_dict(state_dict)
        num_features = _num_features_in(state_dict, self._state_keys())
        if num_features is None:
            # No per-channel entry to infer from: BatchNorm's own checks report the missing
            # keys (or, for a layer without state, accept an empty dict).
            return super().load_state_dict(state_dict)
        with self._unmaterialized_on_error():
            self._materialize(num_features)
            super().load_state_dict(state_dict)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the layer to an .npz file as BatchNorm.save does; raises ValueError before
        materialization."""
        self._require_materialized("save()")
        super().save(path)

    @classmethod
    def load(cls: type[_Lazy], path: str | os.PathLike[str]) -> _Lazy:
        """A materialized LazyBatchNorm from a file written by ``save`` (of BatchNorm or
        LazyBatchNorm)."""
        loaded = BatchNorm.load(path)
        config = loaded._config()
        del config["num_features"]
        layer = cls(**config)
        layer.__dict__.update(loaded.__dict__)
        return layer

    def __repr__(self) -> str:
        if self.num_features is not None:
            return super().__repr__()
        activation = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"LazyBatchNorm(eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}{activation})")


def _num_features_in(state_dict: Mapping[str, ArrayLike], keys: Collection[str]) -> int | None:
    """The length of the first per-channel entry of state_dict among keys, or None."""
    for key in keys:
        if key != "num_batches_tracked" and key in state_dict:
            shape = np.shape(state_dict[key])
            if len(shape) != 1 or shape[0] < 1:
                raise ValueError(f"state dict entry {key!r} has shape {shape}, expected "
                                 f"(num_features,) with num_features >= 1")
            length: int = shape[0]
            return length
    return None

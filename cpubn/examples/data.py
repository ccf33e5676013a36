"""The handwritten digits both examples train on: scikit-learn's ``load_digits``.

1,797 8x8 grey-level images (values 0..16) ship inside scikit-learn, so the examples
need no network access. scikit-learn is an optional dependency of cpubn, imported here
lazily with an actionable message when it is missing.
"""
from dataclasses import dataclass

import numpy as np

INSTALL_HINT = 'the cpubn examples need scikit-learn: pip install "cpubn[examples]"'

# Fixed for every run and every --seed: the seed changes initialization and batch order,
# never which images are test images.
SPLIT_SEED = 0
TEST_FRACTION = 0.25


@dataclass
class Digits:
    x_train: np.ndarray  # float32, (n, 64) flat or (n, 1, 8, 8) / (n, 8, 8, 1) images, in [0, 1]
    y_train: np.ndarray  # int64 labels 0..9
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(layout="flat"):
    """Fixed stratified train/test split of the digits, pixels scaled to [0, 1].

    ``layout``: ``"flat"`` (N, 64), ``"nchw"`` (N, 1, 8, 8) or ``"nhwc"`` (N, 8, 8, 1).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc

    shapes = {"flat": (-1, 64), "nchw": (-1, 1, 8, 8), "nhwc": (-1, 8, 8, 1)}
    if layout not in shapes:
        raise ValueError(f"layout must be one of {sorted(shapes)}, got {layout!r}")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(shapes[layout])
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target)
    return Digits(np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test)


def minibatches(n_samples, batch_size, rng):
    """Endless stream of index arrays: a fresh shuffle every epoch, the last partial batch dropped."""
    while True:
        order = rng.permutation(n_samples)
        for start in range(0, n_samples - batch_size + 1, batch_size):
            yield order[start:start + batch_size]

"""Errors that suggest the fix when it can be guessed: the other layout's feature axis,
and how to reshape a 1-D array."""
import numpy as np
import pytest

import cpubn


@pytest.mark.parametrize("shape", [(4, 6, 6, 16), (2, 3, 5, 5, 16), (4, 7, 16)])
def test_channels_last_data_on_a_channels_first_layer_suggests_axis_minus_1(shape):
    with pytest.raises(ValueError, match=r"did you mean axis=-1\? .*BatchNorm\(16, axis=-1\)"):
        cpubn.BatchNorm(16)(np.zeros(shape, np.float32))


def test_channels_first_data_on_a_channels_last_layer_suggests_axis_1():
    with pytest.raises(ValueError, match=r"did you mean axis=1\?"):
        cpubn.BatchNorm(16, axis=-1)(np.zeros((4, 16, 6, 6), np.float32))


@pytest.mark.parametrize("shape", [(4, 6, 6, 15), (4, 15, 6, 6)])
def test_no_guess_when_no_axis_matches(shape):
    with pytest.raises(ValueError, match="expected num_features=16") as info:
        cpubn.BatchNorm(16)(np.zeros(shape, np.float32))
    assert "did you mean" not in str(info.value)


def test_hint_only_names_an_axis_of_the_right_length():
    # Axis 1 is wrong and the last axis is not 16 either, though axis 2 is: no guess then.
    with pytest.raises(ValueError) as info:
        cpubn.BatchNorm(16)(np.zeros((4, 8, 16, 3), np.float32))
    assert "did you mean" not in str(info.value)


def test_one_sample_of_features_is_told_to_reshape_to_one_row():
    with pytest.raises(ValueError, match=r"one sample of 16 features is x.reshape\(1, -1\)"):
        cpubn.BatchNorm(16).eval()(np.zeros(16, np.float32))
    x = np.ones(16, np.float32)
    assert cpubn.BatchNorm(16).eval()(x.reshape(1, -1)).shape == (1, 16)    # the hint works


def test_values_of_one_feature_are_told_to_reshape_to_a_column():
    with pytest.raises(ValueError, match=r"x.reshape\(-1, 1\)") as info:
        cpubn.BatchNorm(1)(np.zeros(10, np.float32))
    assert "reshape(1, -1)" not in str(info.value)


def test_functional_1d_gets_both_reshapes():
    with pytest.raises(ValueError, match=r"reshape\(1, -1\).*reshape\(-1, 1\)"):
        cpubn.batch_norm_forward(np.zeros(10, np.float32))

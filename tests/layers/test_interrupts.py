"""A KeyboardInterrupt raised by a signal handler during training steps finds each step
whole or not begun: running_mean, running_var and num_batches_tracked change together
(the running-statistics kernel increments the count in the call that updates them).

A one-shot timer interrupts each of many small steps at a random point; after every
step, interrupted or not, the state must be the state before it, or one complete update
of it.  (Before the count moved into the kernel call, about 1.6% of such steps updated
the statistics without counting them.)"""
import os
import signal
import time

import numpy as np
import pytest

import cpubn
from bn_testing import bitwise_equal

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")

LAYERS = {
    "BatchNorm": lambda: cpubn.BatchNorm(16, momentum=None),
    "GhostBatchNorm": lambda: cpubn.GhostBatchNorm(16, 4, momentum=None),
    "BatchRenorm": lambda: cpubn.BatchRenorm(16, momentum=None),
}


@pytest.mark.skipif(os.environ.get("CPUBN_SANITIZED") == "1",
                    reason="the sanitized build's steps are too slow for the timer")
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_an_interrupted_step_is_whole_or_not_begun(kind):
    layer = LAYERS[kind]()
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((8, 16)).astype(np.float32) * (1 + i % 3) + i % 5
               for i in range(16)]
    armed = {"on": False}

    def interrupt(signum, frame):
        if armed["on"]:              # only inside the step; once per step
            armed["on"] = False
            raise KeyboardInterrupt

    start = time.perf_counter()
    for x in batches * 8:
        layer(x)
    step_time = (time.perf_counter() - start) / (8 * len(batches))
    delays = rng.uniform(0, 1.5 * step_time, 5000)
    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted = 0
    try:
        for step, delay in enumerate(delays):
            x = batches[step % len(batches)]
            before = (layer.running_mean.copy(), layer.running_var.copy(),
                      layer.num_batches_tracked)
            try:
                armed["on"] = True
                signal.setitimer(signal.ITIMER_REAL, delay)
                layer(x)
                armed["on"] = False
            except KeyboardInterrupt:
                interrupted += 1
            armed["on"] = False
            mean, var, count = layer.running_mean, layer.running_var, layer.num_batches_tracked
            same = bitwise_equal(mean, before[0]) and bitwise_equal(var, before[1])
            if count == before[2]:
                assert same, f"step {step}: statistics updated, count not"
            else:
                assert count == before[2] + 1 and not same, f"step {step}: count only"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > 100, interrupted            # the timer did interrupt steps

"""``python -m cpubn bench``: cpubn's speed against NumPy, PyTorch and a memory-bandwidth
roofline, on this machine.

Modules, imported one way (each only imports those above it):

- ``harness``: shapes and layouts, interleaved timing, the roofline's parallel copy,
  the machine description, the options and the loop every sweep shares;
- ``peers``: cpubn, plain NumPy and PyTorch BatchNorm as callables over shared buffers;
- ``report`` and ``plot``: the text tables and the ``--plot`` figure;
- the benches: ``batchnorm`` (the default), ``fused``, ``half``, ``contention``,
  ``sync``, ``small_batch``;
- ``cli``: the command line, dispatching to a bench by its flag.
"""


def main(argv=None):
    """``python -m cpubn bench [options]``; returns the exit status."""
    from .cli import main as cli_main
    return cli_main(argv)

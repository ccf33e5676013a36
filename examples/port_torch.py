"""Port a trained PyTorch CNN's BatchNorms to cpubn: see cpubn/examples/port_torch.py."""
import sys

from cpubn.examples.port_torch import main

if __name__ == "__main__":
    sys.exit(main())

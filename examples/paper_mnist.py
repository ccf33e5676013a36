"""Batch Normalization paper, section 4.1, on the 8x8 digits: see cpubn/examples/paper_mnist.py."""
import sys

from cpubn.examples.paper_mnist import main

if __name__ == "__main__":
    sys.exit(main())

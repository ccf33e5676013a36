"""BatchNorm's small-batch remedies on the 8x8 digits: see cpubn/examples/small_batch.py."""
import sys

from cpubn.examples.small_batch import main

if __name__ == "__main__":
    sys.exit(main())

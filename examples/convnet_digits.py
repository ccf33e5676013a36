"""A BatchNorm conv net in NCHW and NHWC layouts: see cpubn/examples/convnet.py."""
import sys

from cpubn.examples.convnet import main

if __name__ == "__main__":
    sys.exit(main())

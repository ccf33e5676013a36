"""Edge inference with folded BatchNorms: see cpubn/examples/edge_inference.py."""
import sys

from cpubn.examples.edge_inference import main

if __name__ == "__main__":
    sys.exit(main())

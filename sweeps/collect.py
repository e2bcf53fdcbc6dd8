"""`python sweeps/collect.py MULTIRUN_DIR [--metric nll]`: same as `python -m diffusion_lab.sweeps collect`."""

import sys

from diffusion_lab.sweeps import main

if __name__ == "__main__":
    main(["collect", *sys.argv[1:]])

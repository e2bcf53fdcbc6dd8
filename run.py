"""diffusion-lab entry point: `python run.py [experiment=NAME] [key=value ...]`, `-m` for sweeps.

The same app as the installed `diffusion-lab` command and `python -m diffusion_lab` (diffusion_lab/app.py)."""

from diffusion_lab.app import main

if __name__ == "__main__":
    main()

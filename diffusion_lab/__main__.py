"""`python -m diffusion_lab [key=value ...]`: the same command as `diffusion-lab` and `python run.py`."""

from diffusion_lab.app import main

if __name__ == "__main__":
    main()

"""ldm: masked diffusion language models from pretrained masked LMs."""

__version__ = "0.1.0"

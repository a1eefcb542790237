"""Black-box backdoor defense: purify inputs with a diffusion model, then query the black box."""

__version__ = "0.1.0"

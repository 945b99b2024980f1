"""Training: the diffusion objective, the loop and checkpoints (the only users of accelerate)."""

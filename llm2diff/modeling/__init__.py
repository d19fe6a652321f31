"""The block-diffusion model: architecture checks, attention masks, the mask token, the DiffusionLM wrapper."""

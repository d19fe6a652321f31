"""Training: data loading/tokenization and the block-diffusion trainer."""

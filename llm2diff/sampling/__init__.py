"""Decoding a block-diffusion LM: one `DecodingConfig` (config.py), a decoder per mode (decoders.py: the block
sampler in sampler.py, verified.py, lossless.py), one `GenerateOutput` (output.py), the commit rules (rules.py)."""

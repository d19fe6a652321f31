"""Sampling from a block-diffusion LM: the KV-cached block sampler and its commit rules."""

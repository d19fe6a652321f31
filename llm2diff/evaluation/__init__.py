"""Evaluation: grading generated answers, the diffusion model side by side with its AR parent."""

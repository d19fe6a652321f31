"""Corrupting targets: noise schedules, noise levels, masking and loss weights (pure functions)."""

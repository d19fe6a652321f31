"""ARC-AGI the way the strongest open solvers do it: propose candidate grids, then score them under augmentations."""

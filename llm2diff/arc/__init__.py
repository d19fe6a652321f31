"""ARC-AGI solving: test-time training, candidate search with a probability floor, product-of-experts scoring."""

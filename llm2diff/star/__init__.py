"""STaR-style self-training rounds (`llm2diff star`)."""

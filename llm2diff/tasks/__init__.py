"""Built-in tasks (training data, evaluation graders) that need no download."""

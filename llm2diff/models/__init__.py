"""Model loading helpers: built-in offline aliases and checkpoint resolution."""

"""`python -m llm2diff ...` (and `accelerate launch -m llm2diff ...`) runs the command-line interface."""

import sys

from llm2diff.cli import main

if __name__ == "__main__":
    sys.exit(main())

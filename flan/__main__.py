"""`python -m flan` is the `flan` command (torchrun launches it this way)."""
import sys

from flan.cli import main

sys.exit(main())

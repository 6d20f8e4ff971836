"""`python -m flashfx ...` is the `flashfx` command."""
import sys

from flashfx.cli import main

if __name__ == "__main__":
    sys.exit(main())

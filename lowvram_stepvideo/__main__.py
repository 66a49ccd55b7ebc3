"""`python -m lowvram_stepvideo ...`: the same command line as generate.py (see --help)."""
import sys

from .face.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m lowvram_stepvideo"))

"""`python -m sparselayer`: the command line, so torchrun can start it (`torchrun ... -m sparselayer train`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

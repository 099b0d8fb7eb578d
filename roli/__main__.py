"""`python -m roli COMMAND ...`: the same as the `roli` console command."""

import sys

from roli.cli import main

if __name__ == "__main__":
    sys.exit(main())

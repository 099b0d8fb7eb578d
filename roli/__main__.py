"""`python -m roli COMMAND ...`: the same as the `roli` console command."""

import sys

from roli.cli import main

sys.exit(main())

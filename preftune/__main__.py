"""`python -m preftune`: the same as the `preftune` command."""

import sys

from preftune.cli import command_line

sys.exit(command_line())

"""`python -m difffeat` runs the CLI."""

import sys

from difffeat.cli import main

sys.exit(main())

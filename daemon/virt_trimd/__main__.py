"""`python -m virt_trimd` runs the CLI."""

import sys

from .cli import main

sys.exit(main())

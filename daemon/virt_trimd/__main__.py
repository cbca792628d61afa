"""`python -m virt_trimd` runs the CLI."""

import sys

from virt_trimd.cli import main

sys.exit(main())

"""`python3 -m sim`: the fleet simulation (see sim.fleet)."""

import sys

from sim.fleet import main

sys.exit(main())

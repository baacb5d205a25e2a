"""`python -m quotra_dev.demo`."""

import sys

from quotra_dev.demo import main

sys.exit(main())

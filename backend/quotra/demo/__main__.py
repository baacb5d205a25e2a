"""`python -m quotra.demo`."""

import sys

from quotra.demo import main

sys.exit(main())

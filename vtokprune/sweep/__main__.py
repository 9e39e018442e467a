"""`python -m vtokprune.sweep ...`, the same as `vtokprune sweep ...`."""

import sys

from .command import main

sys.exit(main())

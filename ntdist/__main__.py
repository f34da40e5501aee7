"""`python -m ntdist ...` is the same as the `ntdist` command."""

import sys

from ntdist.cli import main

sys.exit(main())

"""`python -m paratrain ...`: the same as the `paratrain` command."""

import sys

from paratrain.cli import main

sys.exit(main())

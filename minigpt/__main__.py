"""`python -m minigpt ...` (and `torchrun -m minigpt ...`) runs the command line."""

import sys

from minigpt.cli import main

sys.exit(main())

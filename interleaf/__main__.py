"""`python -m interleaf ...` (what `deepspeed -m interleaf` and `torchrun -m interleaf` run)."""

import sys

from interleaf.cli import main

sys.exit(main())

"""``python -m vseinf`` (what ``torchrun … -m vseinf train`` runs)."""

import sys

from .cli import main

sys.exit(main())

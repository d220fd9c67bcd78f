"""``python -m safeanchor ...`` (what ``accelerate launch -m`` and ``torchrun -m`` start)."""
import sys

from .cli import main

sys.exit(main())

"""``python -m cosytools`` = the ``cosytools`` command."""
import sys

from .cli import main

sys.exit(main())

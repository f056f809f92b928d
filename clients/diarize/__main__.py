"""``python -m clients.diarize``: the diarize command line."""
import sys

from .cli import main

sys.exit(main())

"""``python -m ldke_peft ...`` is the ``ldke`` command."""

import sys

from .cli import main

sys.exit(main())

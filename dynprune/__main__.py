"""``python -m dynprune``: the same CLI as the ``dynprune`` script, for machines where the
script's folder is not on PATH (a ``pip install --target`` or ``--user`` install)."""

import sys

from dynprune.cli import main

sys.exit(main())

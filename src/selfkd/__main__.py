"""``python -m selfkd`` is the ``selfkd`` command."""

import sys

from selfkd.cli import main

sys.exit(main())

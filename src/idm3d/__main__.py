"""``python -m idm3d`` (and ``torchrun -m idm3d``) runs the command line."""

from __future__ import annotations

import sys

from idm3d.cli.main import main

sys.exit(main())

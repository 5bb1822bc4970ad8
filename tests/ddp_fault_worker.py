"""A torchrun worker for the DDP write-fault test: ``idm3d`` with a write fault injected in one process.

``IDM3D_TEST_FAULT="RANK:STAGE:NTH:ERRNO"`` (e.g. ``0:weights rename:2:ENOSPC``) makes the process of that rank
fail the ``NTH`` write of ``STAGE`` as ``tests/test_training_faults.py`` does in one process (its ``_inject``);
the other processes run unchanged. Not a test module: ``torchrun tests/ddp_fault_worker.py train ...``.
"""

from __future__ import annotations

import errno
import os
import sys

import pytest

from idm3d.cli.main import main
from test_training_faults import _inject

if __name__ == "__main__":
    rank, stage, nth, code = os.environ["IDM3D_TEST_FAULT"].split(":")
    if os.environ.get("RANK") == rank:
        _inject(pytest.MonkeyPatch(), stage, int(nth), getattr(errno, code))
    sys.exit(main(sys.argv[1:]))

"""Time ``idm3d detect`` on one 64^3 volume alone: the 64^3 goal of docs/detect.md without the study around it.

The same measurement as the last step of the detect study (:func:`benchmarks.detect_study.time_64`: a
central 64^3 crop of the MNI T2 template with its T1, features through the IDMUNet run, twice), for a
machine that was busy while the study ran. Prints JSON (wall and process CPU seconds of each volume).

    python benchmarks/detect_timing.py runs/demo/t1_to_t2/idm [--threads 2]
"""

from __future__ import annotations

import argparse
import json

from benchmarks.detect_study import time_64
from idm3d.detect.core import DetectSettings
from idm3d.runs.load import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an IDMUNet translation run of the demo data (e.g. runs/demo/t1_to_t2/idm)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    run = load_run(args.run, device="cpu")
    print(json.dumps(time_64(run, DetectSettings().resolved(run), args.threads), indent=2))


if __name__ == "__main__":
    main()

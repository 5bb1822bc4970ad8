"""System time of fresh large tensors: the kernel's page faults, with 4 KiB or huge pages.

    python benchmarks/page_fault_probe.py [ROUNDS]
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/page_fault_probe.py [ROUNDS]

Each round allocates a 1 GiB tensor, fills it and multiplies it into a second one, then frees both;
with ``MALLOC_MMAP_THRESHOLD_=131072`` (as ``IDM3D_MALLOC=tuned``) or any block over 32 MiB, glibc
maps them fresh each time. Prints the process's user and system CPU time. Used for the huge-pages
section of docs/bench/README.md.
"""

from __future__ import annotations

import resource
import sys

import torch


def main(argv: list[str]) -> None:
    rounds = int(argv[0]) if argv else 20
    torch.set_num_threads(1)
    start = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(rounds):
        a = torch.empty(256 * 2**20)  # 1 GiB of fp32
        a.fill_(1.0)
        b = a * 2
        del a, b
    end = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"{rounds} x 1 GiB: user {end.ru_utime - start.ru_utime:.2f} s, system {end.ru_stime - start.ru_stime:.2f} s"
    )


if __name__ == "__main__":
    main(sys.argv[1:])

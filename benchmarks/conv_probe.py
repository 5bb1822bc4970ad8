"""Forward + backward of one 3D convolution at one size: plain, in depth slabs, or channels-last.

    python benchmarks/conv_probe.py CIN COUT SIZE MODE [REPEATS [THREADS]]
    MODE: plain | slab<MiB> (idm3d.invertible.slab_conv with that slab size) | cl (channels_last_3d)
          | slab<MiB>cl (depth slabs of a channels-last input)

Prints wall and process CPU time and GFLOP per second of each repeat. With ``ONEDNN_VERBOSE=1`` oneDNN
names the kernel of every call (``ref:any`` is its naive reference kernel). Used for the 256^3 analysis
in docs/bench/README.md, e.g. ``ONEDNN_VERBOSE=1 python benchmarks/conv_probe.py 16 32 256 plain``.
"""

from __future__ import annotations

import sys
import time

import torch

from idm3d.invertible.slab_conv import slab_conv3d


def main(argv: list[str]) -> None:
    cin, cout, n, mode = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    repeats = int(argv[4]) if len(argv) > 4 else 1
    torch.set_num_threads(int(argv[5]) if len(argv) > 5 else 2)
    torch.manual_seed(0)
    w = torch.randn(cout, cin, 3, 3, 3, requires_grad=True)
    b = torch.randn(cout, requires_grad=True)
    x = torch.randn(1, cin, n, n, n)
    if mode.endswith("cl"):
        x = x.to(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    gflop = 3 * 2 * cin * cout * 27 * n**3 / 1e9  # forward, input gradient, weight gradient
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        if mode.startswith("slab"):
            y = slab_conv3d(x, w, b, slab_bytes=int(mode[4:].removesuffix("cl")) * 2**20)
        else:
            y = torch.nn.functional.conv3d(x, w, b, padding=1)
        t1 = time.perf_counter()
        y.backward(torch.ones_like(y))
        t2, cpu = time.perf_counter(), time.process_time() - c0
        print(
            f"{mode} {cin}->{cout} @{n}: fwd {t1 - t0:.2f}s bwd {t2 - t1:.2f}s total {t2 - t0:.2f}s cpu {cpu:.2f}s "
            f"{gflop / (t2 - t0):.1f} GFLOP/s {gflop / cpu:.1f} GFLOP/CPU-s",
            flush=True,
        )
        x.grad = w.grad = b.grad = None
        del y


if __name__ == "__main__":
    main(sys.argv[1:])

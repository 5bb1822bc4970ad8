"""Where one memory-efficient ``IDMUNet()`` training step spends its CPU time, by ATen operator.

    python benchmarks/op_profile.py SIZE THREADS [TOP]

Runs one warm-up step, times one step (process CPU and wall), then profiles a third with
``torch.profiler`` and prints the operators by self CPU time, then the convolutions by input shape
(``aten::slow_conv3d_forward`` is PyTorch's native loop, chosen over oneDNN for small 5D inputs).
Used for the throughput analysis in docs/bench/README.md, e.g. ``python benchmarks/op_profile.py 64 1``.
Set ``THP_MEM_ALLOC_ENABLE=1`` as the ``idm3d`` command does (``idm3d.allocator``).
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from idm3d.nets import IDMUNet

CONV_OPS = ("aten::mkldnn_convolution", "aten::slow_conv3d_forward", "aten::convolution_backward")


def main(argv: list[str]) -> None:
    size, threads = int(argv[0]), int(argv[1])
    top = int(argv[2]) if len(argv) > 2 else 25
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = IDMUNet(memory_efficient=True)
    x, t = torch.randn(1, 1, size, size, size), torch.tensor([500])

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x, t).square().mean().backward()

    step()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    print(f"step at {size}^3, {threads} thread(s): {time.process_time() - cpu:.2f} CPU-s, "
          f"{time.perf_counter() - wall:.2f} s wall")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profiled self CPU time {total / 1e6:.2f} s (profiler overhead included)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        share = 100 * e.self_cpu_time_total / total
        print(f"{e.self_cpu_time_total / 1e6:8.3f} s {share:5.1f}%  x{e.count:<5d} {e.key}")
    print("convolutions by input shapes:")
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in CONV_OPS]
    for e in sorted(shaped, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"{e.self_cpu_time_total / 1e6:8.3f} s  x{e.count:<3d} {e.key} {e.input_shapes[:3]}")


if __name__ == "__main__":
    main(sys.argv[1:])

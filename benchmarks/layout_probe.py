"""SiLU's backward with a channels-last gradient and a contiguous pre-activation, against one layout.

    python benchmarks/layout_probe.py [CHANNELS SIZE]    # default 16 64: a full-resolution coupling map

Prints milliseconds of process CPU time per call on one thread: ``silu_backward`` with mixed layouts
(what the memory-efficient step's fused GroupNorm-SiLU backward meets after a channels-last convolution),
with the gradient made contiguous first, with both operands in one layout, and the plain copy that
every variant includes (its output buffer). Used for docs/bench/README.md's throughput analysis.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch


def per_call_ms(fn: Callable[[], object], calls: int = 20) -> float:
    fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def main(argv: list[str]) -> None:
    channels, size = (int(argv[0]), int(argv[1])) if len(argv) > 1 else (16, 64)
    torch.set_num_threads(1)
    z = torch.randn(1, channels, size, size, size)
    grad_cl = torch.randn_like(z).contiguous(memory_format=torch.channels_last_3d)
    grad = grad_cl.contiguous()
    silu_backward = torch.ops.aten.silu_backward.grad_input
    mixed = per_call_ms(lambda: silu_backward(grad_cl, z, grad_input=z.clone()))
    converted = per_call_ms(lambda: silu_backward(grad_cl.contiguous(), z, grad_input=z.clone()))
    same = per_call_ms(lambda: silu_backward(grad, z, grad_input=z.clone()))
    copy = per_call_ms(z.clone)
    print(
        f"{channels} x {size}^3: mixed layouts {mixed:.1f} ms, gradient made contiguous first {converted:.1f} ms, "
        f"one layout {same:.1f} ms (each includes a {copy:.1f} ms copy for its output)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])

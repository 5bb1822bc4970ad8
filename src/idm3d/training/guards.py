"""Training guards: finding where NaN/Inf come from, and the invertible reconstruction drift check.

Both run only on demand: the non-finite diagnosis after a step has already been found bad (hooks on every
module would slow every step), the drift check every ``train.drift_check_every`` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from idm3d.jsonio import json_safe

__all__ = [
    "all_finite",
    "diagnose_nonfinite",
    "drift_fields",
    "drift_verdict",
    "first_nonfinite_output",
    "nonfinite_gradients",
]


def all_finite(*tensors: Tensor | None) -> bool:
    """True when every given tensor holds only finite values (``None`` counts as finite)."""
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def first_nonfinite_output(model: nn.Module, run: Callable[[], Any], limit: float | None = None) -> str | None:
    """Run ``run()`` with a forward hook on every sub-module; return the first module (in execution order)
    whose output holds NaN/Inf (or, with ``limit``, a value whose magnitude exceeds it), as
    ``"name (Class)"``, or ``None`` when every output passes.

    Hooks fire when a module *finishes*, so a leaf that produces NaN is reported before the blocks that
    contain it.
    """

    def bad(t: Tensor) -> bool:
        if not bool(torch.isfinite(t).all()):
            return True
        return limit is not None and t.numel() > 0 and float(t.detach().abs().max()) > limit

    found: list[str] = []
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def check(module: nn.Module, _inputs: Any, output: Any) -> None:
            if not found and any(bad(t) for t in _tensors(output) if t.is_floating_point()):
                found.append(f"{name or '<model>'} ({type(module).__name__})")

        return check

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of parameters whose ``.grad`` holds NaN/Inf, in registration order."""
    return [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


def diagnose_nonfinite(
    model: nn.Module, inputs: dict[str, Tensor | None], forward: Callable[[], Any], loss_and_backward: Callable[[], Any]
) -> str:
    """Explain a non-finite step: bad input, the first module with a non-finite output, an overflowing
    loss (naming the first module whose output is too large to square), or bad or overflowing gradients.

    Args:
        model: the network.
        inputs: named input tensors of the step (checked first).
        forward: reruns the step's forward pass.
        loss_and_backward: reruns forward + backward (gradients are left on the parameters); may return the loss.
    """
    bad_inputs = [k for k, v in inputs.items() if v is not None and not all_finite(v)]
    if bad_inputs:
        return f"the input batch is non-finite ({', '.join(bad_inputs)}); check the data"
    module = first_nonfinite_output(model, forward)
    if module is not None:
        return f"first non-finite output from module {module}"
    model.zero_grad(set_to_none=True)
    try:
        loss = loss_and_backward()
        bad = nonfinite_gradients(model)
        grads = [(float(p.grad.detach().abs().max()), n) for n, p in model.named_parameters()
                 if p.grad is not None and p.grad.numel()]
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad.detach().float()) for p in model.parameters() if p.grad is not None]
        ))) if grads else 0.0
    finally:
        model.zero_grad(set_to_none=True)
    if isinstance(loss, Tensor) and not all_finite(loss.detach()):
        # Every output is finite but the loss is not: some output is so large its square overflows.
        big = first_nonfinite_output(model, forward, limit=torch.finfo(torch.float32).max ** 0.5)
        where = f"first too-large output from module {big}" if big is not None else "the model output is too large"
        return f"every module output is finite but the loss is {float(loss.detach()):g}; {where} (lower train.lr?)"
    if bad:
        owner = bad[0].rsplit(".", 1)[0]
        return f"forward is finite; non-finite gradient first in module {owner} (parameter {bad[0]}, {len(bad)} in all)"
    if grads and not np.isfinite(norm):
        peak, name = max(grads)
        return (f"gradients are finite but their norm overflows; largest in module {name.rsplit('.', 1)[0]} "
                f"(parameter {name}, max |grad| {peak:.3g}; lower train.lr?)")
    return "forward and backward are finite when rerun (non-determinism or a transient overflow)"


def drift_fields(errors: dict[str, float]) -> dict[str, Any]:
    """Metrics-log fields of a drift check: every op's max abs rebuild error, the worst op and its error."""
    worst = max(errors, key=lambda k: errors[k] if np.isfinite(errors[k]) else float("inf"))
    return {"drift": json_safe(errors), "drift_max": errors[worst], "drift_op": worst}


def drift_verdict(errors: dict[str, float], threshold: float, step: int) -> str | None:
    """What is wrong when the worst rebuild error (a NaN counts as the worst) exceeds ``threshold``, else ``None``."""
    if not errors:
        return None
    worst = drift_fields(errors)["drift_op"]
    if errors[worst] <= threshold:
        return None
    return (f"reconstruction drift at step {step}: segment {worst} rebuilds its input with max abs error "
            f"{errors[worst]:.3g} > train.drift_threshold {threshold:g}")

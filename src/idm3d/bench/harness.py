"""Shared benchmark machinery: the measurement of one training step, in a fresh process per configuration.

Every configuration runs in its own Python process (:func:`idm3d.children.run_config`) so that one configuration's
allocator caches, high-water marks and lazily-initialised kernels never leak into the next. Inside
the child, ``measure_training_step`` reports the peak memory *growth* of one training step over the
memory held after the model and inputs were built, its time, its FLOPs and, on CUDA with
``nvidia-ml-py`` installed, its energy and the GPU temperature.
"""

from __future__ import annotations

import gc
import resource
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Reporting helpers live in ``report``; re-exported so benchmarks import one module.
from idm3d.bench.report import (
    Column,
    add_common_arguments,
    emit,
    json_line,
    machine_info,
    machine_markdown,
    markdown_table,
    parse_sizes,
    plot_grouped_bars,
    progress,
    ratio,
    resolve_device,
)
from idm3d.children import GIB, MIB, announce_baseline, current_rss_bytes, run_config, status_kib
from idm3d.errors import ConfigError

__all__ = [
    "GIB",
    "MIB",
    "Column",
    "GpuMonitor",
    "add_common_arguments",
    "count_step_flops",
    "current_rss_bytes",
    "emit",
    "json_line",
    "machine_info",
    "machine_markdown",
    "markdown_table",
    "measure_training_step",
    "parse_sizes",
    "plot_grouped_bars",
    "progress",
    "ratio",
    "reset_peak_rss",
    "resolve_device",
    "run_config",
]



# --------------------------------------------------------------------------- CPU memory


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; ``False`` where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    hwm, rss = status_kib("VmHWM"), status_kib("VmRSS")
    # A reset that worked leaves the high-water mark at (about) the current RSS.
    return hwm is not None and rss is not None and hwm <= rss + 4096


def _peak_rss_bytes(method: str) -> int:
    if method == "vmhwm":
        return (status_kib("VmHWM") or 0) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --------------------------------------------------------------------------- GPU energy / temperature


class GpuMonitor:
    """Energy (NVML counter delta) and temperature/power sampled in a background thread.

    Every field is ``None`` when ``nvidia-ml-py`` is missing or the GPU does not report it.
    """

    FIELDS = ("energy_j_per_step", "gpu_temp_c_max", "gpu_temp_c_mean", "gpu_power_w_mean")

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._nvml: Any = None
        self._handle: Any = None
        self._temps: list[float] = []
        self._powers: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy0: int | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._find_handle(pynvml, device)
        except Exception:
            self._nvml = None

    @staticmethod
    def _find_handle(pynvml: Any, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:  # CUDA_VISIBLE_DEVICES may renumber GPUs: match by UUID first
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:
            return pynvml.nvmlDeviceGetHandleByIndex(index)

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._nvml, name)(self._handle, *args)
        except Exception:
            return None

    def _sample(self) -> None:
        while not self._stop.is_set():
            temp = self._call("nvmlDeviceGetTemperature", self._nvml.NVML_TEMPERATURE_GPU)
            power = self._call("nvmlDeviceGetPowerUsage")
            if temp is not None:
                self._temps.append(float(temp))
            if power is not None:
                self._powers.append(power / 1000.0)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self._nvml is None:
            return
        self._energy0 = self._call("nvmlDeviceGetTotalEnergyConsumption")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self, steps: int) -> dict[str, float | None]:
        """Stop sampling; energy is returned per step (joules)."""
        out: dict[str, float | None] = dict.fromkeys(self.FIELDS)
        if self._nvml is None:
            return out
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        energy1 = self._call("nvmlDeviceGetTotalEnergyConsumption")
        if self._energy0 is not None and energy1 is not None and steps > 0:
            out["energy_j_per_step"] = (energy1 - self._energy0) / 1000.0 / steps  # counter is in mJ
        if self._temps:
            out["gpu_temp_c_max"] = max(self._temps)
            out["gpu_temp_c_mean"] = statistics.fmean(self._temps)
        if self._powers:
            out["gpu_power_w_mean"] = statistics.fmean(self._powers)
        return out


# --------------------------------------------------------------------------- one training step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_memory(model: nn.Module, step: Callable[[], Any], device: torch.device, method: str) -> dict:
    """Peak memory growth of one ``step`` over the memory held just before it, and its time."""
    model.zero_grad(set_to_none=True)  # the step's own gradients count as growth
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        if method == "vmhwm":
            reset_peak_rss()
        base = current_rss_bytes() or 0
        # ru_maxrss can sit above the current RSS (setup garbage); growth is measured from the higher.
        base = max(base, _peak_rss_bytes(method)) if method == "ru_maxrss" else base
        announce_baseline(base)
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        peak = _peak_rss_bytes(method)
    return {
        "baseline_mib": base / MIB,
        "peak_mib": peak / MIB,
        "peak_growth_mib": max(peak - base, 0) / MIB,
        "step_s": time.perf_counter() - wall,
        "step_cpu_s": time.process_time() - cpu,
        "end_mib": (torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes() or 0)
        / MIB,
    }


def measure_training_step(
    model: nn.Module,
    step: Callable[[], Any],
    device: torch.device | str,
    *,
    warmup: int = 1,
    repeats: int = 3,
    min_time_s: float = 0.0,
    count_flops: bool = True,
) -> dict[str, Any]:
    """Measure the first training step of a fresh model and the steady state after warm-up.

    ``step`` runs forward + backward; gradients are cleared before every step.

    Args:
        model: the module whose gradients are reset before each step.
        step: callable running forward and backward once.
        device: where the model lives; CUDA uses ``max_memory_allocated`` and CUDA events.
        warmup: untimed steps after the first one, before the steady-state step.
        repeats: timed steady steps (at least; the steady memory step is the first of them on
            CPU); ``step_s`` is their median. ``warmup=0`` and ``repeats=0`` measure the first
            step only (``bench max-size``).
        min_time_s: keep timing until this much time passed (energy counters need a window).
        count_flops: count FLOPs of one step with ``FlopCounterMode``.

    Returns:
        ``first_step_growth_mib`` / ``first_step_s`` / ``first_step_cpu_s`` (the first step),
        ``steady_growth_mib`` (one step after the warm-up; ``None`` where the high-water mark
        cannot be reset), ``retained_mib`` (memory held after the first step beyond the
        baseline: allocator caches), ``peak_growth_mib`` (the larger of first and steady),
        ``baseline_mib``, ``memory_method``, ``step_s`` (median), ``step_s_min``, ``step_cpu_s``
        (median process CPU time, all threads), ``timed_steps``, ``flops`` and the
        ``GpuMonitor`` fields.
    """
    device = torch.device(device)
    if repeats < 0 or warmup < 0:
        raise ConfigError(f"repeats and warmup must be >= 0, got repeats={repeats}, warmup={warmup}")
    announce_baseline(current_rss_bytes() if device.type == "cpu" else None)
    # Without a resettable high-water mark only the first step has a clean peak measurement.
    method = "vmhwm" if device.type == "cpu" and reset_peak_rss() else "ru_maxrss"
    first = _measure_memory(model, step, device, method)
    result: dict[str, Any] = {
        "memory_method": "cuda_max_allocated" if device.type == "cuda" else method,
        "baseline_mib": first["baseline_mib"],
        "first_step_growth_mib": first["peak_growth_mib"],
        "first_step_s": first["step_s"],
        "first_step_cpu_s": first["step_cpu_s"],
        "retained_mib": first["end_mib"] - first["baseline_mib"],
        "steady_growth_mib": None,
    }
    steady = warmup > 0 or repeats > 0
    for _ in range(max(warmup - 1, 0)):
        model.zero_grad(set_to_none=True)
        step()
    times: list[float] = []
    cpu_times: list[float] = []
    if steady and method != "ru_maxrss" and min_time_s <= 0:
        # The steady memory step is an ordinary step: it is also the first timed one.
        measured = _measure_memory(model, step, device, method)
        result["steady_growth_mib"] = measured["peak_growth_mib"]
        times.append(measured["step_s"])
        cpu_times.append(measured["step_cpu_s"])
    elif steady and method != "ru_maxrss":
        result["steady_growth_mib"] = _measure_memory(model, step, device, method)["peak_growth_mib"]
    result["peak_growth_mib"] = max(result["first_step_growth_mib"], result["steady_growth_mib"] or 0.0)

    monitor = GpuMonitor(device) if device.type == "cuda" else None
    _sync(device)
    if monitor is not None:
        monitor.start()
    started = time.perf_counter()
    while steady and (len(times) < repeats or time.perf_counter() - started < min_time_s):
        model.zero_grad(set_to_none=True)
        c0 = time.process_time()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    result.update(
        step_s=statistics.median(times) if times else None,
        step_s_min=min(times) if times else None,
        step_cpu_s=statistics.median(cpu_times) if cpu_times else None,
        timed_steps=len(times),
    )
    if monitor is not None:
        result.update(monitor.stop(len(times)))
    else:
        result.update(dict.fromkeys(GpuMonitor.FIELDS))

    result["flops"] = None
    if count_flops:
        try:
            result["flops"] = count_step_flops(model, step)
        except RuntimeError as err:  # a counting failure must not discard the measurements
            result["flops_error"] = str(err).splitlines()[0]
    return result


class _GlobalOnlyTracker:
    """Replaces FlopCounterMode's per-module tracker, whose backward hooks break ``autograd.grad``
    calls made inside a custom backward (the memory-efficient segments); totals are unaffected."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnlyTracker:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def count_step_flops(model: nn.Module, step: Callable[[], Any]) -> int:
    """FLOPs of one step, as ``torch.utils.flop_counter`` counts them (a multiply-add is 2).

    Ops run inside custom backward functions (activation rebuilding) are counted too: they are
    work the step really does.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnlyTracker()  # type: ignore[assignment]
    with counter:
        step()
    return int(counter.get_total_flops())



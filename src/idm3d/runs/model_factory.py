"""Build the denoiser named in the config, and describe its architecture for checkpoint checks.

``model.name: idm`` builds :class:`idm3d.nets.idm_unet.IDMUNet` (imported lazily, so a broken or
missing optional piece of the invertible stack only matters when it is asked for) with its own signature
defaults; ``monai`` builds MONAI's ``DiffusionModelUNet`` with the one baseline recipe,
:func:`idm3d.nets.baselines.monai_kwargs`. Both share the call ``net(x, timesteps, context=None)``. The channel
counts come from the task: ``in = targets + sources`` (sources are concatenated to the noisy target;
plus 3 with ``data.patch.coordinates``), ``out = targets``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
from typing import Any

from torch import nn

from idm3d.errors import ConfigError

__all__ = [
    "architecture_signature",
    "baseline_model",
    "build_model",
    "model_channels",
    "required_multiple",
    "size_multiple",
]

_SET_BY_TASK = ("spatial_dims", "in_channels", "out_channels")


def model_channels(data: Any) -> tuple[int, int]:
    """``(in_channels, out_channels)`` for a ``DataConfig``: targets (+ sources for translation, + the three
    coordinate channels with ``data.patch.coordinates``)."""
    n_targets = len(data.targets)
    n_sources = len(data.sources) if data.task == "translate" else 0
    n_coords = 0
    if data.patch.coordinates:
        from idm3d.diffusion.coordinates import COORDINATE_CHANNELS  # lazy: the diffusion package imports MONAI

        n_coords = COORDINATE_CHANNELS
    return n_targets + n_sources + n_coords, n_targets


def _idm_class() -> type[nn.Module]:
    try:
        return importlib.import_module("idm3d.nets.idm_unet").IDMUNet
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"model.name: 'idm' is unavailable ({err}); use model.name=monai") from None


def _monai_defaults() -> dict[str, Any]:
    from idm3d.nets.baselines import monai_kwargs

    return {k: v for k, v in monai_kwargs().items() if k not in _SET_BY_TASK}


def _resolved_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` over the model's defaults: IDMUNet's signature, or the MONAI baseline recipe."""
    for key in _SET_BY_TASK:
        if key in kwargs:
            raise ConfigError(
                f"model.kwargs.{key}: set by the task (data.targets/data.sources), remove it from model.kwargs"
            )
    if name == "idm":
        params = inspect.signature(_idm_class()).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not p.empty and p.name not in _SET_BY_TASK}
    elif name == "monai":
        return _fit_to_widths({**_monai_defaults(), **kwargs}, given=kwargs)
    else:
        raise ConfigError(f"model.name: expected idm|monai, got {name!r}")
    return {**defaults, **kwargs}


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(cap, n) + 1) if n % d == 0)


def _fit_to_widths(kw: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The recipe's GroupNorm groups and attention head size, or (unless set) the largest that divide every width."""
    try:
        g = math.gcd(*(int(c) for c in kw["channels"]))
    except (TypeError, ValueError):
        return kw  # MONAI names the bad value
    for key, default in (("norm_num_groups", 32), ("num_head_channels", 32)):
        size = kw.get(key, default)
        if key not in given and isinstance(size, int) and g % size:
            kw[key] = _largest_divisor(g, size)
    return kw


def build_model(model_cfg: Any, in_channels: int, out_channels: int) -> nn.Module:
    """Instantiate the denoiser of a ``ModelConfig`` (``name`` + ``kwargs``).

    Raises:
        ConfigError: unknown model name, bad kwargs (named), or the IDM network cannot be imported.
    """
    name = model_cfg.name
    kwargs = _resolved_kwargs(name, dict(model_cfg.kwargs))
    if name == "idm":
        cls = _idm_class()
    else:
        from monai.networks.nets import DiffusionModelUNet as cls
    try:
        return cls(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {cls.__name__} rejected the options ({err})") from None
    except (ValueError, AssertionError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.kwargs: {msg}") from None


def size_multiple(model: nn.Module) -> int:
    """Spatial sizes the model accepts are multiples of this (its number of 2x downsamplings)."""
    if hasattr(model, "size_multiple"):
        return int(model.size_multiple)
    blocks = getattr(model, "down_blocks", None)
    return 2 ** (len(blocks) - 1) if blocks is not None else 1


def required_multiple(model_cfg: Any) -> int:
    """The multiple spatial sizes must have for the configured model, known without building it."""
    kw = _resolved_kwargs(model_cfg.name, dict(model_cfg.kwargs))
    try:
        n_down = int(kw["levels"]) - 1 if model_cfg.name == "idm" else len(kw["channels"]) - 1
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"model.kwargs: cannot tell the number of levels ({err})") from None
    return 2 ** max(n_down, 0)


def architecture_signature(model: nn.Module, model_cfg: Any | None = None) -> dict[str, Any]:
    """A JSON-able description of the architecture; ``digest`` changes with any parameter name/shape."""
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    digest = hashlib.sha256(json.dumps([type(model).__qualname__, shapes]).encode()).hexdigest()
    sig: dict[str, Any] = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "in_channels": getattr(model, "in_channels", None),
        "out_channels": getattr(model, "out_channels", None),
        "num_tensors": len(shapes),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "digest": digest,
    }
    if model_cfg is not None:
        sig["name"] = model_cfg.name
        sig["kwargs"] = dict(model_cfg.kwargs)
    return sig


def baseline_model(idm: Any) -> Any:
    """The MONAI baseline matching an IDMUNet ``ModelConfig``: the baseline recipe at its width and depth.

    :func:`idm3d.nets.baselines.monai_kwargs` with the IDMUNet's widths per level (it doubles its width per
    level by default, ``down_fraction=0.25``), blocks per level and attention levels.
    """
    from idm3d.nets.baselines import monai_kwargs
    from idm3d.runs.config import ModelConfig

    kw = _resolved_kwargs("idm", dict(idm.kwargs))
    c, levels = int(kw["channels"]), int(kw["levels"])
    growth = 8 * float(kw["down_fraction"])
    widths = tuple(round(c * growth**level) for level in range(levels))
    recipe = {k: v for k, v in monai_kwargs(widths).items() if k not in _SET_BY_TASK}
    attention = kw["attention"] != "none"
    recipe.update(
        channels=list(widths),
        num_res_blocks=int(kw["blocks_per_level"]),
        attention_levels=[bool(a) and attention for a in kw["attention_levels"]],
    )
    recipe = _fit_to_widths(recipe, given={})
    recipe.setdefault("norm_num_groups", 32)
    return ModelConfig("monai", recipe)

"""Build the denoiser named in the config, and describe its architecture for checkpoint checks.

``model.name: idm`` builds :class:`idm3d.nets.idm_unet.IDMUNet` (imported lazily, so a broken or
missing optional piece of the invertible stack only matters when it is asked for) with its own signature
defaults; ``monai`` builds MONAI's ``DiffusionModelUNet`` with the one baseline recipe,
:func:`idm3d.nets.baselines.monai_kwargs`. Both share the call ``net(x, timesteps, context=None)``. The channel
counts come from the task: ``in = targets + sources`` (sources are concatenated to the noisy target;
plus 3 with ``data.patch.coordinates``), ``out = targets``.

A built network is described by a *model record* (:func:`model_record`), saved as the run's ``model.json``
and in every checkpoint's safetensors metadata: a registry name (:data:`MODEL_REGISTRY`, an allowlist; no
class path is ever imported from a file) and the full constructor arguments, defaults resolved.
:func:`build_model_from_record` rebuilds the network from a record alone, without the run's config.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from idm3d.errors import ArgumentError, ConfigError

__all__ = [
    "MODEL_FORMAT",
    "MODEL_REGISTRY",
    "SET_BY_TASK",
    "architecture_signature",
    "baseline_model",
    "build_model",
    "build_model_from_record",
    "check_model_record",
    "model_channels",
    "model_class",
    "model_record",
    "record_disagreement",
    "required_multiple",
    "size_multiple",
]

SET_BY_TASK = ("spatial_dims", "in_channels", "out_channels")  # model.kwargs may not set these
MODEL_FORMAT = "idm3d-model-v1"
# model.name -> (module, class): the only classes a model record may name.
MODEL_REGISTRY: dict[str, tuple[str, str]] = {
    "idm": ("idm3d.nets.idm_unet", "IDMUNet"),
    "monai": ("monai.networks.nets", "DiffusionModelUNet"),
}


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


def model_class(name: str) -> type[nn.Module]:
    """The network class of ``model.name`` (``idm``, ``monai``) from :data:`MODEL_REGISTRY`.

    Raises:
        ConfigError: a name not in the registry, or its class cannot be imported.
    """
    if name not in MODEL_REGISTRY:
        raise ConfigError(f"model.name: expected {'|'.join(MODEL_REGISTRY)}, got {name!r}")
    module, cls = MODEL_REGISTRY[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        other = "monai" if name == "idm" else "idm"
        raise ConfigError(f"model.name: {name!r} is unavailable ({err}); use model.name={other}") from None


def _idm_class() -> type[nn.Module]:
    return model_class("idm")


def _monai_defaults() -> dict[str, Any]:
    from idm3d.nets.baselines import monai_kwargs

    return {k: v for k, v in monai_kwargs().items() if k not in SET_BY_TASK}


def _resolved_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` over the model's defaults: IDMUNet's signature, or the MONAI baseline recipe."""
    for key in SET_BY_TASK:
        if key in kwargs:
            raise ConfigError(
                f"model.kwargs.{key}: set by the task (data.targets/data.sources), remove it from model.kwargs"
            )
    if name == "idm":
        params = inspect.signature(_idm_class()).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not p.empty and p.name not in SET_BY_TASK}
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


def _jsonable(value: Any, key: str) -> Any:
    """``value`` as plain JSON data (tuples as lists); ConfigError naming ``key`` for anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{key}: {type(value).__name__} values cannot be recorded in model.json, got {value!r}")


def model_record(model_cfg: Any, in_channels: int, out_channels: int) -> dict[str, Any]:
    """What rebuilds the network of a ``ModelConfig`` for a task: ``{"format", "name", "class", "kwargs"}``.

    ``kwargs`` are the full constructor arguments (``spatial_dims``, ``in_channels``, ``out_channels`` and
    every default resolved), as JSON data. :func:`build_model_from_record` builds from it.

    Raises:
        ConfigError: unknown model name, or kwargs the network does not take (named).
    """
    name = model_cfg.name
    kwargs = _resolved_kwargs(name, dict(model_cfg.kwargs))
    cls = model_class(name)
    try:
        full = _call_arguments(cls, spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {cls.__name__} rejected the options ({err})") from None
    return {
        "format": MODEL_FORMAT,
        "name": name,
        "class": cls.__name__,
        "kwargs": {k: _jsonable(v, f"model.kwargs.{k}") for k, v in full.items()},
    }


def _call_arguments(cls: type, **kwargs: Any) -> dict[str, Any]:
    from idm3d.nets.config import call_arguments  # lazy: nets imports torch modules only when asked

    return call_arguments(cls, **kwargs)


def check_model_record(record: Any, source: str = "model.json") -> tuple[type[nn.Module], dict[str, Any]]:
    """``(class, kwargs)`` of a model record, checked; CheckpointError naming ``source`` for a bad one.

    The class comes from :data:`MODEL_REGISTRY` by the record's ``name`` only: a record naming anything else
    is refused, never imported.
    """
    from idm3d.errors import CheckpointError

    if not isinstance(record, Mapping):
        raise CheckpointError(f"{source}: expected a model record (a JSON object), got {type(record).__name__}")
    if record.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{source}: not an idm3d model record (format {record.get('format')!r}, "
                              f"expected {MODEL_FORMAT!r})")
    name, kwargs = record.get("name"), record.get("kwargs")
    if name not in MODEL_REGISTRY:
        raise CheckpointError(f"{source}: unknown model name {name!r} (known: {', '.join(MODEL_REGISTRY)})")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"{source}: 'kwargs' must be a JSON object of constructor arguments")
    try:
        cls = model_class(name)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    if record.get("class", cls.__name__) != cls.__name__:
        raise CheckpointError(f"{source}: model {name!r} is {cls.__name__}, the record says {record.get('class')!r}")
    return cls, dict(kwargs)


def build_model_from_record(record: Mapping[str, Any], source: str = "model.json") -> nn.Module:
    """The network a model record (``model.json``, or a checkpoint's metadata) describes, freshly initialised.

    Example::

        record = json.loads(Path("runs/t1t2/model.json").read_text())
        net = idm3d.build_model_from_record(record)  # then load weights into it

    Raises:
        CheckpointError: not a model record, a name outside :data:`MODEL_REGISTRY`, or arguments the
            network refuses (each naming ``source``).
    """
    from idm3d.errors import CheckpointError

    cls, kwargs = check_model_record(record, source)
    try:
        return _construct(cls, kwargs)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def record_disagreement(record: Mapping[str, Any], model_cfg: Any) -> str | None:
    """Where a ``ModelConfig`` contradicts a model record (its name, or a kwarg it sets), or ``None``.

    Only what the config states is compared (its channels depend on the data section, which a record
    makes unnecessary)."""
    if record.get("name") != model_cfg.name:
        return f"model.name: config {model_cfg.name!r} vs model record {record.get('name')!r}"
    kwargs = record.get("kwargs") or {}
    for key, value in dict(model_cfg.kwargs).items():
        try:
            mine = _jsonable(value, key)
        except ConfigError:
            mine = value
        if key not in kwargs or kwargs[key] != mine:
            return f"model.kwargs.{key}: config {value!r} vs model record {kwargs.get(key)!r}"
    return None


def _construct(cls: type[nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {cls.__name__} rejected the options ({err})") from None
    except ArgumentError as err:
        if err.argument not in kwargs:
            raise
        raise ConfigError(f"model.kwargs.{err.argument}: {err.detail}") from None
    except (ValueError, AssertionError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.kwargs: {msg}") from None


def build_model(model_cfg: Any, in_channels: int, out_channels: int) -> nn.Module:
    """Instantiate the denoiser of a ``ModelConfig`` (``name`` + ``kwargs``): the network of
    :func:`model_record` for these channels.

    Raises:
        ConfigError: unknown model name, bad kwargs (named), or the IDM network cannot be imported.
    """
    record = model_record(model_cfg, in_channels, out_channels)
    return _construct(model_class(record["name"]), record["kwargs"])


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
    recipe = {k: v for k, v in monai_kwargs(widths).items() if k not in SET_BY_TASK}
    attention = kw["attention"] != "none"
    recipe.update(
        channels=list(widths),
        num_res_blocks=int(kw["blocks_per_level"]),
        attention_levels=[bool(a) and attention for a in kw["attention_levels"]],
    )
    recipe = _fit_to_widths(recipe, given={})
    recipe.setdefault("norm_num_groups", 32)
    return ModelConfig("monai", recipe)

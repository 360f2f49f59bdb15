"""Flat, validated parameters from YAML files, papermill parameters or a notebook namespace.

The edge of the library. Parameters are flat keys (papermill's ``-f`` merge is a shallow
``dict.update``); every key is declared once, as a field of :mod:`fcr.options`, and :data:`SCHEMA`
is derived from those fields. :func:`validate` fails at once with one :class:`ConfigError` naming
the key and what is allowed, before any work is done; :func:`load_options` and
:func:`from_namespace` return the typed :class:`fcr.options.Options` the library works with.
YAML is read with ``yaml.safe_load`` (YAML 1.1: ``1e-4`` is a *string*, ``1.0e-4`` a float), so a
number-looking string for a numeric key gets a message that says how to write it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fcr.options import FEATURE_GROUP_NAMES, SCHEDULER_NAMES, Options, field_specs

__all__ = ["FEATURE_GROUP_NAMES", "SCHEDULER_NAMES", "SCHEMA", "SETTING_TASKS", "TASKS", "ConfigError", "Param", "from_namespace",
           "load_options", "load_params", "parse_sets", "to_options", "load_yaml", "merge", "rule_of", "validate"]


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type or impossible."""


Check = Callable[[Any], "str | None"]

# The flat kind of each option's type annotation (fcr.options declares the options).
_KINDS = {"int": "int", "float": "float", "bool": "bool", "str": "str", "tuple[int, ...]": "int_list",
          "tuple[float, ...]": "float_list", "tuple[str, ...]": "str_list", "KeySchedule": "key_schedule"}


@dataclass(frozen=True)
class Param:
    """One flat parameter, derived from its :mod:`fcr.options` field: expected type ("int", "float",
    "bool", "str", "int_list", "float_list", "str_list", "key_schedule"), default, one-line doc,
    allowed choices and an extra check that returns an error text or None."""

    kind: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    check: Check | None = None


def rule_of(param: Param) -> str:
    """The constraint of ``param`` in words: its choices and its check's rule."""
    parts = [f"one of {', '.join(map(str, param.choices))}"] if param.choices else []
    if param.check is not None:
        parts.append(getattr(param.check, "rule", "checked by a custom rule (fcr/options.py)"))
    return "; ".join(parts)


def _schema() -> dict[str, Param]:
    out = {}
    for key, (annotation, default, meta) in field_specs().items():
        default = list(default) if isinstance(default, tuple) else default
        out[key] = Param(_KINDS[annotation], default, meta["doc"], meta["choices"], meta["check"])
    return out


SCHEMA: dict[str, Param] = _schema()


def _type_error(key: str, kind: str, value: Any) -> ConfigError:
    hint = ""
    if isinstance(value, str) and kind in ("float", "int"):
        try:
            float(value)
            hint = (
                f" YAML 1.1 reads numbers like {value!r} as strings: write it with a dot and a signed "
                f"exponent (e.g. 1.0e-4) or as a plain decimal."
            )
        except ValueError:
            pass
    return ConfigError(f"parameter {key!r}: expected {kind}, got {type(value).__name__} {value!r}.{hint}")


def _coerce(key: str, kind: str, value: Any) -> Any:
    """Check ``value`` against ``kind``; ints are accepted for floats, bools never for numbers."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(key, kind, value)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, kind, value)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, kind, value)
        if not math.isfinite(value):
            raise ConfigError(f"parameter {key!r}: must be a finite number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise _type_error(key, kind, value)
        return value
    if kind in ("int_list", "float_list", "str_list"):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, f"a list of {kind[:-5]}", value)
        return [_coerce(f"{key}[{i}]", kind[:-5], v) for i, v in enumerate(value)]
    if kind == "key_schedule":
        if isinstance(value, str):
            if value not in ("uniform", "50ls"):
                raise ConfigError(f"parameter {key!r}: allowed 'uniform', '50ls' or a list of key-step indices, got {value!r}")
            return value
        return _coerce(key, "int_list", value)
    raise AssertionError(f"unknown parameter kind {kind!r}")


def _check_key_schedule(params: dict[str, Any]) -> None:
    keys = params["key_schedule"]
    if isinstance(keys, str):
        return
    n = params["num_inference_steps"]
    if not keys:
        raise ConfigError("parameter 'key_schedule': an explicit list must not be empty")
    if keys[0] != 0:
        raise ConfigError(f"parameter 'key_schedule': must start with key step 0 (the first step always runs the encoder), got {keys}")
    if any(b <= a for a, b in zip(keys, keys[1:])):
        raise ConfigError(f"parameter 'key_schedule': key steps must be strictly increasing, got {keys}")
    if keys[-1] >= n:
        raise ConfigError(f"parameter 'key_schedule': key steps must lie in [0, num_inference_steps={n}), got {keys}")


def _check_validation(params: dict[str, Any]) -> None:
    if params["validate_every"] and params["validate_stride"] > params["validate_steps"]:
        raise ConfigError(f"parameter 'validate_stride': must be <= validate_steps={params['validate_steps']}, "
                          f"got {params['validate_stride']}")


def _check_peers(params: dict[str, Any]) -> None:
    n = params["num_inference_steps"]
    late = [g for g in params["tgate_gate_steps"] if g > n]
    if late:
        raise ConfigError(f"parameter 'tgate_gate_steps': every gate step must be <= num_inference_steps={n}, "
                          f"got {late[0]}")
    if params["tgate_gate_steps"] and params["guidance_scale"] <= 1:
        raise ConfigError("parameter 'tgate_gate_steps': T-GATE drops classifier-free guidance at its gate; it needs "
                          f"guidance_scale > 1, got {params['guidance_scale']}")


def _check_distillation(params: dict[str, Any]) -> None:
    steps, rounds = params["distill_base_steps"], params["distill_rounds"]
    if params["distill_method"] == "consistency":
        over = [n for n in params["distill_sampling_steps"] if n > steps]
        if over:
            raise ConfigError(f"parameter 'distill_sampling_steps': each must be <= distill_base_steps={steps} (the "
                              f"solver grid the sampler picks its steps from), got {over[0]}")
        return
    if steps % 2**rounds:
        raise ConfigError(f"parameter 'distill_rounds': distill_base_steps={steps} does not halve exactly {rounds} "
                          "times (each student step must be two teacher steps); use a multiple of "
                          f"{2**rounds}, got {rounds}")


def _check_cache_training(params: dict[str, Any]) -> None:
    if params["train_objective"] != "cache_aware":
        return
    n = params["cache_steps"]
    if params["cache_interval"] >= n:
        raise ConfigError(f"parameter 'cache_interval': must be < cache_steps={n} (a key step every "
                          f"cache_interval steps), got {params['cache_interval']}")
    if params["lambda_fcr"] != 0:
        raise ConfigError(f"parameter 'lambda_fcr': cache-aware fine-tuning has no FCR term; set 0, got {params['lambda_fcr']}")
    if params["validate_every"]:
        raise ConfigError("parameter 'validate_every': checkpoint selection scores FD against the model's own full "
                          f"sampling; cache-aware runs train a fixed length (set 0), got {params['validate_every']}")
    if params["cache_trainable"] == "scale_shift" and params["ema_decay"]:
        raise ConfigError("parameter 'ema_decay': cache_trainable scale_shift trains the correction beside a frozen "
                          f"UNet, saved from the trained weights (set 0), got {params['ema_decay']}")
    if params["cache_rollouts"] > params["train_batch_size"]:
        raise ConfigError(f"parameter 'cache_rollouts': must be <= train_batch_size={params['train_batch_size']}, "
                          f"got {params['cache_rollouts']}")


def validate(params: Mapping[str, Any], *, fill_defaults: bool = True) -> dict[str, Any]:
    """Validate flat parameters and return them with defaults filled in.

    Raises :class:`ConfigError` with one message naming the first bad key.
    """
    unknown = [k for k in params if k not in SCHEMA]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, SCHEMA, n=1)
        did_you_mean = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown parameter {key!r}{did_you_mean}; known parameters: {', '.join(sorted(SCHEMA))}")
    out: dict[str, Any] = {k: p.default for k, p in SCHEMA.items()} if fill_defaults else {}
    for key, value in params.items():
        spec = SCHEMA[key]
        value = _coerce(key, spec.kind, value)
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"parameter {key!r}: allowed {list(spec.choices)}, got {value!r}")
        if spec.check is not None:
            err = spec.check(value)
            if err:
                raise ConfigError(f"parameter {key!r}: {err}, got {value!r}")
        out[key] = value
    if fill_defaults:
        _check_key_schedule(out)
        _check_validation(out)
        _check_peers(out)
        _check_distillation(out)
        _check_cache_training(out)
    return out


TASKS = ("data", "finetune", "distill", "sweep", "robustness", "mechanistic", "frontier", "human", "evaluate")
# The tasks each setting implements ("evaluate": the sharded evaluation at SD scale, python -m fcr evaluate).
SETTING_TASKS = {"embedded": tuple(t for t in TASKS if t != "evaluate"), "sd": TASKS}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one flat YAML mapping with ``yaml.safe_load``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {str(path)!r} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"parameter file {str(path)!r} must hold a mapping of flat keys, got {type(data).__name__}")
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"parameter file {str(path)!r}: key {key!r} holds a mapping; parameters are flat keys "
                              "(papermill merges -f files with a shallow update)")
    return data


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow merge, later layers win: exactly what papermill does with repeated ``-f`` files."""
    out: dict[str, Any] = {}
    for layer in layers:
        out.update(layer)
    return out


def load_params(*paths: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load, merge (in order) and validate YAML files, then ``overrides``."""
    return validate(merge(*(load_yaml(p) for p in paths), overrides or {}))


def to_options(flat: Mapping[str, Any]) -> Options:
    """Validate flat keys (defaults filled in) and return them typed."""
    return Options.from_flat(validate(flat))


def load_options(*paths: str | Path, overrides: Mapping[str, Any] | None = None) -> Options:
    """:func:`load_params`, typed."""
    return Options.from_flat(load_params(*paths, overrides=overrides))


def from_namespace(namespace: Mapping[str, Any], before: Iterable[str]) -> Options:
    """Validate the parameters a notebook defined or papermill injected; return them typed.

    ``before`` is the set of global names that existed before the parameters cell; every new
    public name is a parameter, so a misspelt injected key fails here instead of papermill's
    mere warning.
    """
    skip = set(before)
    return Options.from_flat(validate({k: v for k, v in namespace.items() if k not in skip and not k.startswith("_")}))


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``--set key=value`` items as flat keys (each value read as YAML, so ``--set seeds=[0,1]`` is a list)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out

"""Config loading shared by both stages: dataclasses built from YAML plus `--key value` overrides.

A run config is a dataclass whose fields are plain values or nested dataclass sections
(`data`, `model`, `training`, ...). `load_config` reads `--config file.yaml`, applies command-line
overrides (`--training.learning_rate 3e-4`, or `--learning_rate 3e-4` when the name is unique),
and builds the dataclass tree, failing before any work starts with a message that names the key,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import sys
import types
import typing
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union

import yaml
from accelerate.state import PartialState
from importlib.resources import files
from importlib.resources.abc import Traversable

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and how to fix it."""


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of dataclass `cls` (Any where one cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # a base class annotates with names its module imports lazily (transformers configs)
        hints = {}
        for klass in reversed(cls.__mro__):
            namespace = vars(sys.modules[klass.__module__])
            for name, annotation in vars(klass).get("__annotations__", {}).items():
                try:
                    hints[name] = typing._eval_type(typing.ForwardRef(annotation), namespace, None) if isinstance(
                        annotation, str) else annotation
                except Exception:
                    hints[name] = Any
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _user_fields(cls: type) -> dict[str, Any]:
    """The fields a config file sets: all of a plain dataclass, a transformers config's own fields only."""
    own: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("transformers"):
            break
        own |= set(vars(klass).get("__annotations__", {}))
    return {name: tp for name, tp in _field_types(cls).items() if name in own}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _CommandLineValue(str):
    """An override's raw text: read as a string where the field takes one, else parsed as YAML."""


def _accepts_string(tp: Any, value: str) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts_string(option, value) for option in typing.get_args(tp))
    return tp is str


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float)."""
    if isinstance(value, _CommandLineValue):
        if _accepts_string(tp, value) and value.lower() not in ("null", "none", "~"):
            return str(value)
        value = yaml.safe_load(value)
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (item_type, *_) = typing.get_args(tp) or (Any,)
            return type(value)(_coerce(v, item_type, key) for v in value) if origin is tuple else [
                _coerce(v, item_type, key) for v in value
            ]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build_dataclass(tp, value, prefix=f"{key}.")
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {_describe(tp)}")


def build_dataclass(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly nested) dict, rejecting unknown keys and bad types."""
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_by_name:
            close = difflib.get_close_matches(key, list(types_by_name), n=3)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}' for {cls.__name__}.{hint} "
                f"Allowed keys: {', '.join(sorted(types_by_name))}."
            )
        kwargs[key] = _coerce(value, types_by_name[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except Exception as error:  # validation in __post_init__ (ours or transformers' strict configs)
        raise ConfigError(f"invalid {prefix.rstrip('.') or cls.__name__} config: {error}") from error


def _leaf_paths(cls: type, prefix: str = "") -> dict[str, list[str]]:
    """Map every leaf key name to the dotted paths where it occurs in the dataclass tree."""
    paths: dict[str, list[str]] = {}
    for name, tp in _user_fields(cls).items():
        if dataclasses.is_dataclass(tp):
            for leaf, found in _leaf_paths(tp, f"{prefix}{name}.").items():
                paths.setdefault(leaf, []).extend(found)
        else:
            paths.setdefault(name, []).append(prefix + name)
    return paths


def parse_overrides(args: list[str]) -> dict[str, str | None]:
    """Parse `--key value`, `--key=value` and bare `--flag` (meaning true) into a dict."""
    overrides: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key value or --key=value")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = None
            i += 1
        overrides[key] = value
    return overrides


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{part}' is not a section, so '{path}' cannot be set")
        tree = node
    tree[leaf] = value


def recipe_path(name: str | Path) -> Traversable:
    """The shipped recipe `name` ("dvae/demo.yaml", or "configs/dvae/demo.yaml"), from the installed package data.

    Raises `ConfigError` naming the recipes that exist when there is no such recipe: never a fallback.
    """
    relative = Path(name).as_posix().removeprefix("configs/")
    recipe = files("dallekit.configs").joinpath(*relative.split("/"))
    if not recipe_exists(name):
        folder = files("dallekit.configs").joinpath(relative.split("/")[0])
        shipped = sorted(f"{folder.name}/{item.name}" for item in folder.iterdir() if item.name.endswith(".yaml")) \
            if folder.is_dir() else []
        raise ConfigError(
            f"there is no recipe {name!r}" + (f"; the shipped {folder.name} recipes are: {', '.join(shipped)}" if shipped
                                               else "; the recipe folders are dvae/, prior/, scorer/ and accelerate/")
        )
    return recipe


def recipe_exists(name: str | Path) -> bool:
    """Whether dallekit ships the recipe `name` ("scorer/emoji.yaml")."""
    relative = Path(name).as_posix().removeprefix("configs/")
    return files("dallekit.configs").joinpath(*relative.split("/")).is_file()


def read_config_file(config_path: str | Path) -> Traversable | Path:
    """A config file: the path when it exists, else the shipped recipe of that name (`configs/dvae/demo.yaml`)."""
    path = Path(config_path)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") and not path.is_absolute():
        try:
            return recipe_path(path)
        except ConfigError:
            pass
    raise ConfigError(
        f"config file {str(config_path)!r} does not exist; pass --config with a YAML file, or a shipped recipe "
        "such as configs/dvae/demo.yaml"
    )


def load_config(cls: type[T], args: list[str] | None = None) -> T:
    """Load `cls` from `--config FILE.yaml` (optional) and `--key value` overrides in `args`."""
    overrides = parse_overrides(list(args or []))
    tree: dict[str, Any] = {}
    config_path = overrides.pop("config", None)
    if config_path is not None:
        loaded = yaml.safe_load(read_config_file(config_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_path!r} must hold a mapping of keys to values")
        tree = loaded
    leaves = _leaf_paths(cls)
    for key, raw in overrides.items():
        value = True if raw is None else _CommandLineValue(raw)
        if "." not in key:
            found = leaves.get(key, [])
            if len(found) > 1:
                raise ConfigError(f"override --{key} is ambiguous: use one of {', '.join('--' + p for p in found)}")
            if found:
                key = found[0]
        _set_path(tree, key, value)
    return build_dataclass(cls, tree)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of a config tree (for YAML dumps and tracker hyperparameters)."""
    result = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if hasattr(value, "to_diff_dict"):  # a transformers config: keep only what differs from defaults
            value = value.to_diff_dict()
            value.pop("transformers_version", None)
        elif dataclasses.is_dataclass(value):
            value = to_dict(value)
        result[field.name] = value
    return result


PRIOR_ONLY_GRADIENT_CHECKPOINTING = (
    "training.gradient_checkpointing applies to the prior (stage 2) only; the image tokenizer's and the "
    "scorer's activations are small: remove it from this config"
)


@dataclasses.dataclass
class TrainingConfig:
    """Loop settings shared by both stages (optimiser, schedule, precision, checkpoints, logging)."""

    output_dir: str = "outputs/run"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 64  # per process: the effective batch is this x processes x gradient_accumulation_steps
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile (inductor) the training model: ~30% faster prior steps on CPU, ~45 s to compile
    gradient_checkpointing: bool = False  # the prior: recompute layer activations in backward (less memory, slower)
    deterministic: bool = False  # deterministic kernels (cuDNN, cuBLAS): bitwise-repeatable GPU runs and resumes, slower
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None
    log_every: int = 20
    eval_every: int = 250  # validate every N steps and at the last step
    select_best: bool = True  # export the weights of the best validation evaluation (output_dir/best), not the last
    early_stopping_patience: int | None = None  # stop after N evaluations without a better validation metric; None: off
    image_every: int = 250
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    num_workers: int = 0
    push_to_hub: bool = False
    hub_model_id: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                    "log_every", "eval_every", "image_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"training.{name} must be > 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "num_workers", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"training.{name} must be >= 0, got {getattr(self, name)}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(
                f"training.checkpoints_total_limit must be >= 1 or null (keep all), got {self.checkpoints_total_limit}"
            )
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(
                f"training.early_stopping_patience must be >= 1 (evaluations without improvement) or null (off), "
                f"got {self.early_stopping_patience}"
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("training.push_to_hub needs training.hub_model_id (e.g. 'user/dallekit-digits-dvae')")


def describe(cls: type, prefix: str = "") -> str:
    """Usage text: every `--key` of the config tree with its type and default."""
    lines = [] if prefix else [f"usage: --config FILE.yaml [--key value ...]; keys of {cls.__name__}:"]
    defaults = cls()
    for name, tp in _user_fields(cls).items():
        if dataclasses.is_dataclass(tp):
            lines.append(describe(tp, f"{prefix}{name}."))
        else:
            lines.append(f"  --{prefix}{name}  ({_describe(tp)}, default {getattr(defaults, name, None)!r})")
    return "\n".join(lines)


def run_from_command_line(config_cls: type[T], train: Callable[[T], Any], argv: list[str] | None = None) -> None:
    """Entry point of `python -m <stage>.train`: log setup, config from argv, one-line exit on config errors."""
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(describe(config_cls))
        return
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        train(load_config(config_cls, args))
    except ConfigError as error:
        sys.exit(f"error: {error}")
    PartialState().destroy_process_group()  # the trainings keep it for what follows (training.finish_training)

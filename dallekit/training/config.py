"""Config loading shared by both stages: dataclasses built from YAML plus `--key value` overrides.

A run config is a dataclass whose fields are plain values or nested dataclass sections
(`data`, `model`, `training`, ...). `load_config` reads `--config file.yaml`, applies command-line
overrides (`--training.learning_rate 3e-4`, or `--learning_rate 3e-4` when the name is unique),
and builds the dataclass tree, failing before any work starts with a one-line message that names
the key, the value and what is allowed.

The values are checked by pydantic (v2): one `TypeAdapter` per field annotation validates
Literal, unions, Optional and containers, in strict mode on JSON data (YAML values are JSON-shaped:
lists for tuples, strings for paths), whose rules are this module's: an `int` rejects floats, bools
and numeric strings, a `float` takes ints, a `str` takes only strings. YAML floats are read as in
YAML 1.2 (`1e-4`, without a dot, is a float, not YAML 1.1's string). A command-line value is kept
as written where the field takes that string (`--mixed_precision no`), else read as YAML.

Why pydantic rather than draccus: draccus owns the command line (argparse, its own override
syntax, no unique-leaf shortcut, no YAML values per key) and would need decoders for transformers'
configs, while pydantic is only the validator, is widely used and maintained, and is installed
anyway (gradio needs it). Pydantic does not build the tree itself: it silently drops unknown keys of
stdlib dataclasses (here they fail, with close matches), and transformers configs
(`PreTrainedConfig` dataclasses with huggingface_hub's `@strict`) must be built by their own
`__init__` from their own fields only. So `build_dataclass` walks the sections, checks the keys,
validates each value with pydantic and calls `cls(**values)`, turning errors from `__post_init__`
into a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
import re
import sys
import types
import typing
from collections.abc import Callable
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import pydantic
import yaml
from accelerate.state import PartialState
from huggingface_hub.errors import StrictDataclassError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and how to fix it."""


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-4` as a float like YAML 1.2 (YAML 1.1 wants a dot: `1.0e-4`)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)  # a SafeLoader: plain data only


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section field (`DataConfig`, or `DataConfig | None`), None for a plain value."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        (tp, *others) = [option for option in typing.get_args(tp) if option is not type(None)]
        if others:
            return None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _user_fields(cls: type) -> dict[str, Any]:
    """The fields a config file sets and their types: all of a plain dataclass, a transformers config's own only.

    The annotations of the classes below the first transformers class in the MRO (`PreTrainedConfig`'s
    own fields, such as `return_dict`, are not ours to set), evaluated in their modules.
    """
    annotations: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] == "transformers" or klass is object:
            break
        annotations = {**inspect.get_annotations(klass, eval_str=True), **annotations}
    return {f.name: annotations[f.name] for f in dataclasses.fields(cls) if f.init and f.name in annotations}


@functools.cache
def _adapter(tp: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set) and typing.get_args(tp):
        return f"{origin.__name__} of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


class _CommandLineValue(str):
    """An override's raw text: read as a string where the field takes one, else parsed as YAML."""


_AS_JSON = pydantic.TypeAdapter(Any, config=pydantic.ConfigDict(ser_json_inf_nan="constants"))  # .nan, .inf too


def _check(adapter: pydantic.TypeAdapter, value: Any) -> Any:
    """Pydantic's strict validation of JSON data: YAML values are JSON-shaped (lists for tuples, strings for paths)."""
    return adapter.validate_json(_AS_JSON.dump_json(value), strict=True)


def _validate(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` by pydantic in strict mode (int -> float the only conversion)."""
    adapter = _adapter(tp)
    if isinstance(value, _CommandLineValue):
        if tp is not Any and value.lower() not in ("null", "none", "~"):
            try:
                return _check(adapter, str(value))
            except pydantic.ValidationError:
                pass
        value = _load_yaml(value)
    detail = ""
    try:
        return _check(adapter, value)
    except pydantic.ValidationError as error:  # where in a list or mapping, unless the union's options differ there
        first = error.errors(include_url=False)[0]
        if first["loc"] and typing.get_origin(tp) not in (Union, types.UnionType):
            detail = f" ({key}{''.join(f'[{part!r}]' for part in first['loc'])}: {first['msg']})"
    except ValueError:  # not YAML data (pydantic cannot write it as JSON): a Python object given to build_dataclass
        pass
    raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {_describe(tp)}{detail}")


def _one_line(error: Exception) -> str:
    """The message of a validation error on one line (huggingface_hub's strict errors wrap the cause in two)."""
    if isinstance(error, StrictDataclassError) and error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split())


def build_dataclass(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly nested) dict, rejecting unknown keys and bad types."""
    fields = _user_fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}' for {cls.__name__}.{hint} "
                f"Allowed keys: {', '.join(sorted(fields))}."
            )
        tp, section = fields[key], _section_type(fields[key])
        if section is None:
            kwargs[key] = _validate(value, tp, prefix + key)
            continue
        if isinstance(value, _CommandLineValue):
            value = _load_yaml(value)
        if value is None and section is not tp:  # an optional section
            kwargs[key] = None
        elif isinstance(value, dict):
            kwargs[key] = build_dataclass(section, value, prefix=f"{prefix}{key}.")
        else:
            raise ConfigError(
                f"config key '{prefix}{key}' = {value!r} is invalid: expected a section (a mapping of "
                f"{section.__name__} keys{' or null' if section is not tp else ''}), or set one key such as "
                f"--{prefix}{key}.{next(iter(_user_fields(section)), '')}"
            )
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except Exception as error:  # validation in __post_init__ (ours or transformers' strict configs)
        raise ConfigError(f"invalid {prefix.rstrip('.') or cls.__name__} config: {_one_line(error)}") from error


def _leaf_paths(cls: type, prefix: str = "") -> dict[str, list[str]]:
    """Map every leaf key name to the dotted paths where it occurs in the dataclass tree."""
    paths: dict[str, list[str]] = {}
    for name, tp in _user_fields(cls).items():
        if (section := _section_type(tp)) is not None:
            for leaf, found in _leaf_paths(section, f"{prefix}{name}.").items():
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
        key = arg[2:]
        if "=" in key:  # `--key=value`: the value as written (dashes and all)
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = None
            i += 1
        overrides[key.replace("-", "_")] = value
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
            f"there is no recipe {str(name)!r}" + (f"; the shipped {folder.name} recipes are: {', '.join(shipped)}" if shipped
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
        except ConfigError as error:
            raise ConfigError(f"config file {str(config_path)!r} does not exist, and {error}") from None
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
        loaded = _load_yaml(read_config_file(config_path).read_text()) or {}
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
    # a training-time budget: fewer steps where max_steps would not fit, on a schedule that ends with the budget
    # (timed over the first steps: dallekit.training.budget); also stops a run once spent. None: off
    max_train_seconds: float | None = None
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
    init_from: str | None = None  # a saved model (directory or Hub id) to start from: fine-tuning; sizes must match
    overwrite: bool = False  # start over in an output_dir holding an earlier run's checkpoints (they are removed)
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
    # how long a process waits for the others at a collective (several processes): the main process alone writes
    # best/, the grids and the export while the others wait; the process group is set up by the first training
    process_group_timeout: int = 3600  # seconds

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                    "log_every", "eval_every", "image_every", "process_group_timeout")
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
        if (section := _section_type(tp)) is not None:
            lines.append(describe(section, f"{prefix}{name}."))
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

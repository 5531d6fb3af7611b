"""Dataclass configs, named presets and the command lines generated from them.

Every component owns a small keyword-only dataclass whose fields are declared with
:func:`arg` (a default and a one-line help). :func:`build_parser` turns it into an argparse
parser: ``field_name`` becomes ``--field-name``, typed from the annotation (``int``,
``float``, ``str``, ``Path``, ``bool`` → ``--x/--no-x``, ``Literal[...]`` → choices,
``X | None``, ``list[X]``/``tuple[X, ...]`` → several values, positionals included). An unknown
flag or a wrong type is an error; nothing falls back silently. Presets are plain functions
returning a config; ``--preset NAME`` starts from one and the flags given override it.

Usage::

    @dataclass(kw_only=True)
    class ResizeConfig:
        image_size: int = arg(512, help="target side in pixels")

        def __post_init__(self):
            if self.image_size <= 0:
                raise ValueError("image_size: must be positive")

    cfg = parse_config(ResizeConfig, argv, prog="qcap resize")
    save_config(cfg, out_dir / "config.json")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")
_REQUIRED = dataclasses.MISSING


def arg(
    default: Any = _REQUIRED,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    factory: Callable[[], Any] | None = None,
    positional: bool = False,
    shapes_output: bool = True,
) -> Any:
    """A config field with its one-line help. Omit ``default`` for a required flag.

    ``positional=True`` makes it a positional argument (e.g. ``qcap serve DIR``).
    ``shapes_output=False`` declares a field that says how a run runs or where it reads and
    writes (workers, devices, progress, ``--overwrite``, ``--ray-address``, the output folder),
    not what it writes: a resume or re-run may change it, and the dataset card's lineage leaves
    it out. Every other field shapes the output: a stage's output identity, its re-run refusal
    and its resume check are made of exactly these (:func:`output_settings`).
    """
    metadata = {"help": help, "flag": flag, "metavar": metavar, "positional": positional,
                "shapes_output": shapes_output}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ConfigError(ValueError):
    """A config that cannot be built; the message names the field."""


def _resolve_hints(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(module) if module else None)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any, name: str) -> tuple[Callable[[str], Any], list[Any] | None]:
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        kinds = {type(c) for c in choices}
        if len(kinds) != 1:
            raise TypeError(f"{name}: Literal choices must share one type")
        return kinds.pop(), choices
    if tp in (int, float, str):
        return tp, None
    if tp is Path:
        return Path, None
    raise TypeError(f"field {name!r}: type {tp!r} has no command-line form; use int, float, str, Path, bool, Literal")


def _checked_choice(convert: Callable[[str], Any], choices: list[Any]) -> Callable[[str], Any]:
    """A converter that checks ``choices`` itself and lets argparse's SUPPRESS through: an
    optional positional's default is passed through ``type`` when the positional is absent."""
    def parse(text: str) -> Any:
        if text == argparse.SUPPRESS:
            return text
        value = convert(text)
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(map(repr, choices))})")
        return value

    return parse


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def build_parser(
    cls: type,
    *,
    prog: str | None = None,
    description: str | None = None,
    presets: Mapping[str, Callable[[], Any]] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser for dataclass ``cls``; defaults are suppressed so that only the
    flags a user gave are overrides (see :func:`config_from_namespace`)."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog=prog,
            description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            allow_abbrev=False,
        )
    if presets:
        parser.add_argument(
            "--preset",
            choices=sorted(presets),
            default=argparse.SUPPRESS,
            help="start from this named preset; the flags given override its fields",
        )
    hints = _resolve_hints(cls)
    for field in _flag_order(cls):
        if not field.init or field.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        required = field.default is _REQUIRED and field.default_factory is _REQUIRED and not presets
        default = field.default if field.default is not _REQUIRED else None
        help_text = field.metadata.get("help", "")
        if default is not None and field.default is not _REQUIRED:
            help_text += f" (default: {default!r})" if not isinstance(default, bool) else ""
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if field.metadata.get("metavar"):
            kwargs["metavar"] = field.metadata["metavar"]
        flag = flag_name(field)
        if field.metadata.get("positional"):
            several = get_origin(tp) in (list, tuple, Sequence)  # list[X]: one or more values (none if optional)
            convert, choices = _scalar_parser(get_args(tp)[0] if several else tp, field.name)
            kwargs.pop("dest")
            kwargs.pop("default")
            kwargs.setdefault("metavar", field.name.upper())
            if several:
                kwargs["nargs"] = "+" if required else "*"
            if not required:
                kwargs.update(nargs=kwargs.get("nargs", "?"), default=argparse.SUPPRESS)
                if choices is not None:  # argparse (< 3.12) checks an absent '?' positional's default against choices
                    convert, choices = _checked_choice(convert, choices), None
            parser.add_argument(field.name, type=convert, choices=choices, **kwargs)
            continue
        if tp is bool:
            kwargs.pop("metavar", None)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = get_origin(tp)
        if origin in (list, tuple, Sequence):
            inner = get_args(tp)[0]
            convert, choices = _scalar_parser(inner, field.name)
            kwargs.update(type=convert, nargs="+" if not optional else "*", choices=choices)
        else:
            convert, choices = _scalar_parser(tp, field.name)
            kwargs.update(type=convert, choices=choices)
        parser.add_argument(flag, required=required, **kwargs)
    return parser


def config_from_namespace(
    cls: type[T],
    namespace: argparse.Namespace,
    *,
    presets: Mapping[str, Callable[[], T]] | None = None,
    base: T | None = None,
) -> T:
    """Build ``cls`` from a preset (or ``base``, or the defaults) plus the flags given."""
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    hints = _resolve_hints(cls)
    for name, value in given.items():
        if isinstance(value, list) and get_origin(_unwrap_optional(hints[name])[0]) is tuple:
            given[name] = tuple(value)
    preset_name = getattr(namespace, "preset", None)
    if preset_name is not None:
        if not presets or preset_name not in presets:
            raise ConfigError(f"preset: unknown preset {preset_name!r}; choose from {sorted(presets or {})}")
        base = presets[preset_name]()
    try:
        if base is not None:
            return dataclasses.replace(base, **given)
        missing = [
            (f.metadata.get("metavar") or f.name.upper()) if f.metadata.get("positional") else flag_name(f)
            for f in dataclasses.fields(cls)
            if f.init and f.default is _REQUIRED and f.default_factory is _REQUIRED and f.name not in given
        ]
        if missing:
            raise ConfigError(f"missing required flag(s): {', '.join(missing)}")
        return cls(**given)
    except TypeError as err:  # a field the dataclass does not know: a programming error upstream
        raise ConfigError(str(err)) from err


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str | None = None,
    description: str | None = None,
    presets: Mapping[str, Callable[[], T]] | None = None,
) -> T:
    """Parse ``argv`` into a ``cls`` instance; errors exit with argparse's usage message."""
    parser = build_parser(cls, prog=prog, description=description, presets=presets)
    namespace = parser.parse_args(argv)
    try:
        return config_from_namespace(cls, namespace, presets=presets)
    except ValueError as err:  # __post_init__ checks and missing flags
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) dataclass config."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    return convert(cfg)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}")
    hints = _resolve_hints(cls)
    values = {}
    for key, value in data.items():
        tp, _ = _unwrap_optional(hints[key])
        origin = get_origin(tp)
        if tp is Path and value is not None:
            value = Path(value)
        elif origin in (list, tuple) and value is not None:
            if get_args(tp)[:1] == (Path,):  # list[Path], tuple[Path, ...]
                value = [None if v is None else Path(v) for v in value]
            value = tuple(value) if origin is tuple else list(value)
        elif dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            value = from_dict(tp, value)
        values[key] = value
    return cls(**values)


def _flag_order(cls: type) -> list[dataclasses.Field]:
    """A config's fields for ``--help``: its own first, then those of the configs it extends (a
    stage's inputs and settings before the shared run fields, e.g. raykit.ActorJobConfig)."""
    own = set(vars(cls).get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def output_fields(cfg_or_cls: Any) -> tuple[str, ...]:
    """The fields that shape a stage's output (declared with ``arg``), in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cfg_or_cls) if f.metadata.get("shapes_output", True))


def run_fields(cfg_or_cls: Any) -> tuple[str, ...]:
    """The fields declared ``shapes_output=False``: how and where a run runs, not what it writes."""
    return tuple(f.name for f in dataclasses.fields(cfg_or_cls) if not f.metadata.get("shapes_output", True))


def output_settings(cfg: Any) -> dict[str, Any]:
    """The values (as JSON) of the fields that shape ``cfg``'s output: what a re-run must match."""
    values = to_dict(cfg)
    return {name: values[name] for name in output_fields(cfg)}


def save_config(cfg: Any, path: str | os.PathLike, **extra: Any) -> None:
    """Write the resolved config (plus ``extra`` facts such as versions) as JSON, atomically;
    ``path`` may be an fsspec URL, and its folder is created. It records which fields are
    run-only (``run_only``, from the fields' declarations) and the stage's name (``stage``: a
    config class's ``STAGE``), which is all the dataset card's lineage needs of a config."""
    from base.shards import atomic_write_json

    payload = {"config": to_dict(cfg), "config_class": f"{type(cfg).__module__}.{type(cfg).__qualname__}",
               "run_only": list(run_fields(cfg))}
    if getattr(type(cfg), "STAGE", None):
        payload["stage"] = type(cfg).STAGE
    payload.update(extra)
    atomic_write_json(path, payload)


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    with open(path, encoding="utf-8") as handle:
        payload = json.load(handle)
    return from_dict(cls, payload.get("config", payload))

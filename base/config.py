"""Dataclass configs, named presets and the command lines generated from them.

Every component owns a small keyword-only dataclass whose fields are declared with
:func:`arg` (a default and a one-line help). :func:`build_parser` turns it into an argparse
parser: ``field_name`` becomes ``--field-name``, typed from the annotation (``int``,
``float``, ``str``, ``Path``, ``bool`` → ``--x/--no-x``, ``Literal[...]`` → choices,
``X | None``, ``list[X]``/``tuple[X, ...]`` → several values, positionals included). An unknown
flag or a wrong type is an error; nothing falls back silently.

**Nested configs.** A field whose type is itself a dataclass config is declared once, where
that config is (``decode: DecodeParams``, ``trainer: TrainerConfig``): its fields appear as
``--<field>.<sub-field>`` (``--decode.top-p 0.9``, ``--trainer.lr 1e-3``), typed as above and
listed in ``--help`` under a group of their own. The field's default (``arg(factory=...)``: a
function returning the sub-config with this stage's values) gives the nested defaults, so a
stage with other defaults than the sub-config's own writes them there, not in copies of the
fields. ``arg(..., bare_flags=True)`` on the nested field also accepts each sub-field under its
bare flag (``--lr`` for ``--trainer.lr``; ``--help`` lists it as an alias) and, in a saved
config, under its bare key (the flat form written before the field was nested: see
:func:`nest_flat`), so old command lines and old run folders keep working. A nested config's
``__post_init__`` error is reported under its dotted name (``decode.num_captions: ...``).

**Presets.** A preset is a function returning the config, or — when the config has required
fields no preset can know (``--data``, ``--out``) — the part of it the preset sets, typed:
``Settings(TrainRunConfig, model="qcap-tiny-coca")`` (field names checked at once; a nested
field takes its sub-config or a ``Settings`` of it, which then changes only the sub-fields it
names). ``--preset NAME`` starts from it, the flags given override it, and only then are the
required fields checked: those that neither the preset nor the flags set are named in one line,
``missing required flag(s): --data, --out``. ``Settings(...)(data=..., out=...)`` builds the
complete config for Python callers. Without presets, argparse itself names a missing flag.

**Run records.** :func:`save_config` writes the resolved config (nested configs as nested
objects) with ``run_only`` — the fields declared ``shapes_output=False``, nested ones by dotted
name (``trainer.log_every``); :func:`output_settings` and :func:`changed_settings` give what a
re-run or resume must match.

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
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, get_args, get_origin

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
    bare_flags: bool = False,
) -> Any:
    """A config field with its one-line help. Omit ``default`` for a required flag.

    ``positional=True`` makes it a positional argument (e.g. ``qcap serve DIR``).
    ``shapes_output=False`` declares a field that says how a run runs or where it reads and
    writes (workers, devices, progress, ``--overwrite``, ``--ray-address``, the output folder),
    not what it writes: a resume or re-run may change it, and the dataset card's lineage leaves
    it out. Every other field shapes the output: a stage's output identity, its re-run refusal
    and its resume check are made of exactly these (:func:`output_settings`).
    ``bare_flags=True`` (a nested config field only): each sub-field also answers to its bare
    flag and bare saved key (see the module docstring).
    """
    metadata = {"help": help, "flag": flag, "metavar": metavar, "positional": positional,
                "shapes_output": shapes_output, "bare_flags": bare_flags}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ConfigError(ValueError):
    """A config that cannot be built; the message names the field."""


class Settings(Generic[T]):
    """Part of a config ``cls``: the fields a preset sets (see the module docstring).

    ``Settings(TrainRunConfig, model="qcap-tiny-coca", trainer=Settings(TrainerConfig, lr=5e-4))``;
    calling it with the fields it lacks builds the config: ``settings(data="d", out=Path("r"))``.
    """

    def __init__(self, cls: type[T], /, **values: Any) -> None:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown field(s) {unknown}")
        self.cls = cls
        self.values = dict(values)

    def __call__(self, **more: Any) -> T:
        """The complete config: the field defaults, these settings, then ``more``."""
        return _build(self.cls, [self.values, more])

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"Settings({self.cls.__name__}{', ' if inner else ''}{inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and (self.cls, self.values) == (other.cls, other.values)

    __hash__ = None  # type: ignore[assignment]


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


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def nested_fields(cls: type) -> dict[str, type]:
    """The fields of ``cls`` whose type is a dataclass config, with that type."""
    hints = _resolve_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and _is_config(hints[f.name])}


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
    raise TypeError(f"field {name!r}: type {tp!r} has no command-line form; use int, float, str, Path, bool, Literal "
                    "or a dataclass config")


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


def flag_name(field: dataclasses.Field, prefix: str = "") -> str:
    """A field's flag: ``--field-name`` (or its declared ``flag``); under a nested config
    ``prefix`` (``"trainer."``) gives ``--trainer.field-name``."""
    bare = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
    return "--" + prefix.replace("_", "-") + bare[2:] if prefix else bare


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not _REQUIRED:
        return field.default_factory()
    return field.default


def _is_required(field: dataclasses.Field) -> bool:
    return field.default is _REQUIRED and field.default_factory is _REQUIRED


def _add_field(parser, field: dataclasses.Field, tp: Any, optional: bool, *, default: Any, required: bool,
               prefix: str = "", alias: bool = False) -> None:
    help_text = field.metadata.get("help", "")
    if default is not _REQUIRED and default is not None and not isinstance(default, bool):
        help_text += f" (default: {default!r})"
    dest = prefix + field.name
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    if field.metadata.get("metavar"):
        kwargs["metavar"] = field.metadata["metavar"]
    elif prefix and get_origin(tp) is not Literal:  # not DECODE.TOP_P; choices show themselves
        kwargs["metavar"] = field.name.upper()
    flags = [flag_name(field, prefix)] + ([flag_name(field)] if alias else [])
    if field.metadata.get("positional"):
        if prefix:
            raise TypeError(f"field {dest!r}: a nested config's field cannot be positional")
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
        return
    if tp is bool:
        kwargs.pop("metavar", None)
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if get_origin(tp) in (list, tuple, Sequence):
        convert, choices = _scalar_parser(get_args(tp)[0], field.name)
        kwargs.update(type=convert, nargs="+" if not optional else "*", choices=choices)
    else:
        convert, choices = _scalar_parser(tp, field.name)
        kwargs.update(type=convert, choices=choices)
    parser.add_argument(*flags, required=required, **kwargs)


def _add_nested(parser: argparse.ArgumentParser, field: dataclasses.Field, sub_cls: type, *, prefix: str,
                default: Any, alias: bool, group=None) -> None:
    """The flags of nested config field ``field`` (type ``sub_cls``), in an argument group of their own."""
    path = prefix + field.name + "."
    if group is None:
        title = f"{field.name} ({sub_cls.__name__}): {field.metadata.get('help', '')}".rstrip(": ")
        description = (f"each also answers to its bare flag ({flag_name(dataclasses.fields(sub_cls)[0])}, ...)"
                       if alias else None)
        group = parser.add_argument_group(title, description)
    hints = _resolve_hints(sub_cls)
    for sub in _flag_order(sub_cls):
        if not sub.init or sub.name.startswith("_"):
            continue
        sub_default = getattr(default, sub.name) if _is_config(type(default)) else _field_default(sub)
        tp, optional = _unwrap_optional(hints[sub.name])
        if _is_config(tp):
            _add_nested(parser, sub, tp, prefix=path, default=sub_default, alias=False, group=group)
            continue
        _add_field(group, sub, tp, optional, default=sub_default, required=False, prefix=path, alias=alias)


def build_parser(
    cls: type,
    *,
    prog: str | None = None,
    description: str | None = None,
    presets: Mapping[str, Callable[[], Any]] | None = None,
    parser: argparse.ArgumentParser | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser for dataclass ``cls``; defaults are suppressed so that only the
    flags a user gave are overrides (see :func:`config_from_namespace`). ``fixed`` names
    fields the caller sets (a sub-command's choice): they get no flag."""
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
    nested = []
    for field in _flag_order(cls):
        if not field.init or field.name.startswith("_") or field.name in (fixed or {}):
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        if _is_config(tp):
            nested.append((field, tp))
            continue
        if field.metadata.get("bare_flags"):
            raise TypeError(f"field {field.name!r}: bare_flags is for a nested config field")
        required = _is_required(field) and not presets
        _add_field(parser, field, tp, optional, default=field.default, required=required)
    for field, tp in nested:  # after the config's own flags: each nested config is a group of its own
        default = _field_default(field)
        _add_nested(parser, field, tp, prefix="", default=default if default is not _REQUIRED else None,
                    alias=bool(field.metadata.get("bare_flags")))
    return parser


def _given(namespace: argparse.Namespace) -> dict[str, Any]:
    """The flags given, nested: ``{"trainer.lr": 1.0}`` becomes ``{"trainer": {"lr": 1.0}}``."""
    given: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if dest == "preset":
            continue
        *parents, name = dest.split(".")
        target = given
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
    return given


def _values_of(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


def _prefixed(name: str, err: BaseException) -> str:
    """``decode`` + ``num_captions: must be >= 1`` → ``decode.num_captions: must be >= 1``."""
    text = str(err)
    return f"{name}.{text}" if re.match(r"^[A-Za-z_][\w.]*(/[\w.]+)*: ", text) else f"{name}: {text}"


def _build(cls: type[T], layers: Sequence[Any], prefix: str = "") -> T:
    """``cls`` from its field defaults overlaid by ``layers``, in order: each a config instance
    (every field), a :class:`Settings` or a mapping (the fields it names; a nested field's
    mapping or Settings changes only the sub-fields it names). Required fields no layer sets
    are a ConfigError naming their flags."""
    merged: dict[str, Any] = {}
    partial: dict[str, list[Any]] = {}  # nested field -> its layers
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, Settings):
            if not issubclass(cls, layer.cls) and not issubclass(layer.cls, cls):
                raise TypeError(f"Settings of {layer.cls.__name__} given for {cls.__name__}")
            layer = layer.values
        elif dataclasses.is_dataclass(layer) and not isinstance(layer, type):
            layer = _values_of(layer)
        for key, value in layer.items():
            merged[key] = value
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                partial[key] = [value]
            elif isinstance(value, (Settings, Mapping)):
                partial.setdefault(key, []).append(value)
    hints = _resolve_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}")
    values: dict[str, Any] = {}
    missing: list[str] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp, _ = _unwrap_optional(hints[field.name])
        if _is_config(tp) and field.name in merged and merged[field.name] is not None:
            start = _field_default(field)
            sub_layers = partial.get(field.name, [])
            if not (sub_layers and dataclasses.is_dataclass(sub_layers[0])):
                sub_layers = [None if start is _REQUIRED else start, *sub_layers]
            try:
                values[field.name] = _build(tp, sub_layers, prefix=f"{prefix}{field.name}.")
            except ConfigError:
                raise
            except ValueError as err:
                raise ValueError(_prefixed(field.name, err)) from err
            continue
        if field.name not in merged:
            if _is_required(field):
                missing.append((field.metadata.get("metavar") or field.name.upper())
                               if field.metadata.get("positional") else flag_name(field, prefix))
            continue
        value = merged[field.name]
        if isinstance(value, list) and get_origin(tp) is tuple:
            value = tuple(value)
        values[field.name] = value
    if missing:
        raise ConfigError(f"missing required flag(s): {', '.join(missing)}")
    try:
        return cls(**values)
    except TypeError as err:  # a field the dataclass does not know: a programming error upstream
        raise ConfigError(str(err)) from err


def config_from_namespace(
    cls: type[T],
    namespace: argparse.Namespace,
    *,
    presets: Mapping[str, Callable[[], T | Settings[T]]] | None = None,
    base: T | Settings[T] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from its defaults, a preset (or ``base``), the flags given and ``fixed``,
    in that order; then check the required fields (see the module docstring)."""
    preset_name = getattr(namespace, "preset", None)
    if preset_name is not None:
        if not presets or preset_name not in presets:
            raise ConfigError(f"preset: unknown preset {preset_name!r}; choose from {sorted(presets or {})}")
        base = presets[preset_name]()
    return _build(cls, [base, _given(namespace), dict(fixed or {})])


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str | None = None,
    description: str | None = None,
    presets: Mapping[str, Callable[[], T | Settings[T]]] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> T:
    """Parse ``argv`` into a ``cls`` instance; errors exit with argparse's usage message.
    ``fixed``: fields the caller sets (a sub-command's choice); they get no flag."""
    parser = build_parser(cls, prog=prog, description=description, presets=presets, fixed=fixed)
    namespace = parser.parse_args(argv)
    try:
        return config_from_namespace(cls, namespace, presets=presets, fixed=fixed)
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


def nest_flat(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a saved config) with the bare keys of ``bare_flags`` nested configs moved into
    their nested dict: the flat form a config had before a field was nested (``{"lr": 1e-3}``
    → ``{"trainer": {"lr": 1e-3}}``). Keys of ``cls`` itself stay where they are."""
    out = dict(data)
    own = {f.name for f in dataclasses.fields(cls) if f.init}
    for field in dataclasses.fields(cls):
        if not field.metadata.get("bare_flags"):
            continue
        sub_cls = nested_fields(cls).get(field.name)
        if sub_cls is None:
            continue
        sub_names = {f.name for f in dataclasses.fields(sub_cls) if f.init}
        moved = {key: out.pop(key) for key in list(out) if key not in own and key in sub_names}
        if moved:
            current = out.get(field.name)
            out[field.name] = {**moved, **(current if isinstance(current, Mapping) else {})}
    return out


def _from_json(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Saved JSON values as ``cls``'s field types (Paths, tuples; nested configs as mappings)."""
    data = nest_flat(cls, data)
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
        elif _is_config(tp) and isinstance(value, Mapping):
            value = _from_json(tp, value)
        values[key] = value
    return values


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output; unknown keys are an error. Nested configs
    may be given in part (their other fields are the field's default) or, for ``bare_flags``
    fields, in the flat form written before they were nested (:func:`nest_flat`)."""
    return _build(cls, [_from_json(cls, data)])


def _flag_order(cls: type) -> list[dataclasses.Field]:
    """A config's fields for ``--help``: its own first, then those of the configs it extends (a
    stage's inputs and settings before the shared run fields, e.g. raykit.ActorJobConfig)."""
    own = set(vars(cls).get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def _shapes(field: dataclasses.Field) -> bool:
    return field.metadata.get("shapes_output", True)


def output_fields(cfg_or_cls: Any) -> tuple[str, ...]:
    """The fields that shape a stage's output (declared with ``arg``), in declaration order; a
    nested config counts here unless declared run-only as a whole (its own run-only fields are
    in :func:`run_fields`)."""
    return tuple(f.name for f in dataclasses.fields(cfg_or_cls) if _shapes(f))


def run_fields(cfg_or_cls: Any) -> tuple[str, ...]:
    """The fields declared ``shapes_output=False``: how and where a run runs, not what it writes;
    those of a nested config by dotted name (``trainer.log_every``)."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    nested = nested_fields(cls)
    names: list[str] = []
    for field in dataclasses.fields(cls):
        if not _shapes(field):
            names.append(field.name)
        elif field.name in nested:
            names += [f"{field.name}.{sub}" for sub in run_fields(nested[field.name])]
    return tuple(names)


def output_settings(cfg: Any) -> dict[str, Any]:
    """The values (as JSON) of the fields that shape ``cfg``'s output: what a re-run must match
    (a nested config as a dict of its own output-shaping fields)."""
    values = to_dict(cfg)
    out = {}
    for name in output_fields(cfg):
        value = getattr(cfg, name)
        out[name] = output_settings(value) if _is_config(type(value)) else values[name]
    return out


def flatten_settings(values: Mapping[str, Any], cls: type | None = None, prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as dotted keys: ``{"decode": {"top_p": 0.9}}`` → ``{"decode.top_p": 0.9}``
    (with ``cls``, only its nested config fields are flattened; without, every dict)."""
    nested = nested_fields(cls) if cls is not None else None
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and (nested is None or key in nested):
            out.update(flatten_settings(value, nested[key] if nested else None, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def changed_settings(cls: type, saved: Mapping[str, Any], current: Any) -> list[tuple[str, Any, Any]]:
    """``(dotted name, saved, current)`` for each output-shaping setting in which ``current`` (a
    ``cls``) differs from ``saved`` (its :func:`to_dict`, or the flat form of before a field was
    nested); a setting the saved config lacks counts as the field's default."""
    now = flatten_settings(output_settings(current), cls)
    before = flatten_settings(output_settings(from_dict(cls, saved)), cls)
    return [(name, before.get(name), value) for name, value in now.items() if before.get(name) != value]


def save_config(cfg: Any, path: str | os.PathLike, **extra: Any) -> None:
    """Write the resolved config (plus ``extra`` facts such as versions) as JSON, atomically;
    ``path`` may be an fsspec URL, and its folder is created. It records which fields are
    run-only (``run_only``, from the fields' declarations; nested ones by dotted name) and the
    stage's name (``stage``: a config class's ``STAGE``), which is all the dataset card's lineage
    needs of a config."""
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

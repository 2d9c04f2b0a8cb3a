"""Turn plain YAML data into frozen, typed dataclasses, field by field.

The schema is the dataclass definition itself: field types and defaults. Every error
names the file, the dotted field path, what was expected and what was found; an
unknown key gets a "did you mean" suggestion. Only ``yaml.safe_load`` is used, and
no value is ever evaluated or used to name a class.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from medmeta_common.errors import ConfigError

T = TypeVar("T")


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping at its top level."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            source=source, field="", expected="an existing YAML file", found="no such file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            source=source, field="", expected="a readable UTF-8 YAML file", found=str(exc)
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            source=source, field="", expected="valid YAML", found=f"{problem} at {where}"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            source=source,
            field="",
            expected="a mapping of settings at the top level",
            found=_describe(data),
        )
    return data


def build(cls: type[T], data: Any, *, source: str, field: str = "") -> T:
    """Validate ``data`` against dataclass ``cls`` and return a frozen instance.

    Parameters
    ----------
    cls : type
        A dataclass whose field annotations define the schema.
    data : Any
        Plain data as produced by ``yaml.safe_load``.
    source : str
        Where the data came from (a file path), used in error messages.
    field : str
        Dotted path of ``data`` inside the file, used in error messages.

    """
    return typing.cast(T, _convert(cls, data, source=source, field=field))


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        names = [_type_name(a) for a in get_args(tp) if a is not type(None)]
        optional = " or null" if type(None) in get_args(tp) else ""
        return " or ".join(names) + optional
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(get_args(tp)[1])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, *, source: str, field: str) -> Any:
    def fail(hint: str = "") -> ConfigError:
        return ConfigError(
            source=source, field=field, expected=_type_name(tp), found=_describe(value), hint=hint
        )

    if dataclasses.is_dataclass(tp):
        return _build_dataclass(typing.cast(type, tp), value, source=source, field=field)
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise fail()
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, source=source, field=field)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise fail()
    if origin is Literal:
        allowed = get_args(tp)
        # bool is an int subclass: never let `true` match a Literal[1].
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        raise fail(f"did you mean {close[0]!r}?" if close else "")
    if origin is tuple:
        if not isinstance(value, list | tuple):  # YAML gives lists; saved settings tuples
            raise fail()
        (item_type, *_rest) = get_args(tp)
        return tuple(
            _convert(item_type, item, source=source, field=f"{field}[{i}]")
            for i, item in enumerate(value)
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _key_type, item_type = get_args(tp)
        return {
            str(k): _convert(item_type, v, source=source, field=f"{field}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise TypeError(f"unsupported schema type {tp!r} at {field}")  # a bug in our schema


def _build_dataclass(cls: type, value: Any, *, source: str, field: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(
            source=source, field=field or "(top level)", expected="a mapping",
            found=_describe(value),
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    value = _renamed(cls, value, source=source, field=field)
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(fields)
            raise ConfigError(
                source=source,
                field=_join(field, str(key)),
                expected="a known setting",
                found=f"unknown key {key!r}",
                hint=hint,
            )
    kwargs: dict[str, Any] = {}
    for name, spec in fields.items():
        path = _join(field, name)
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], source=source, field=path)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(
                source=source, field=path, expected=_type_name(hints[name]),
                found="nothing (missing)",
            )
    try:
        instance = cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ checks report a field relative to the dataclass.
        raise ConfigError(
            source=source,
            field=_join(field, exc.field),
            expected=exc.expected,
            found=exc.found,
            hint=exc.hint,
        ) from None
    return instance


def _renamed(cls: type, value: dict[str, Any], *, source: str, field: str) -> dict[str, Any]:
    """``value`` with the keys an older schema used (``cls.RENAMED``) under their new names.

    Old configs and checkpoints keep loading; giving both the old and the new key is an
    error naming both.
    """
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    if not any(old in value for old in renamed):
        return value
    out = dict(value)
    for old, new in renamed.items():
        if old in out:
            if new in out and out[new] != out[old]:
                raise ConfigError(source=source, field=_join(field, old),
                                  expected=f"only {new!r} (which replaces {old!r})",
                                  found=f"{old}: {out[old]!r} and {new}: {out[new]!r}")
            out[new] = out.pop(old)
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check(condition: bool, *, field: str, expected: str, found: Any) -> None:
    """Raise a ConfigError for a cross-field or range check in ``__post_init__``.

    The source file is filled in by :func:`build`, which re-raises with the full path.
    """
    if not condition:
        raise ConfigError(source="", field=field, expected=expected, found=repr(found))

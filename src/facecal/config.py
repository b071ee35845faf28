"""Typed access to `params.yaml`.

Every stage declares its knobs as a dataclass whose defaults match `params.yaml`; `load_section`
builds it from the file and refuses unknown or ill-typed keys with a message that names the
field, so a typo in `params.yaml` or in `dvc exp run -S` fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from facecal.errors import FacecalError
from facecal.paths import project_root

T = TypeVar("T")

DEFAULT_PARAMS_FILE = "params.yaml"


class ParamsError(FacecalError):
    """A params file or section is missing, malformed, or has a bad field."""


def read_params(path: str | Path | None = None) -> dict[str, Any]:
    """The whole params file as a dict (`params.yaml` at the project root by default)."""
    path = Path(path) if path else project_root() / DEFAULT_PARAMS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: params file not found") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_section(
    cls: type[T],
    section: str,
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Build dataclass `cls` from section `section` of the params file.

    `overrides` maps dotted keys inside the section (``{"epochs": 3, "adam.lr": 1e-3}``) to
    values applied on top of the file; used by tests and by the CLI's ``--set`` option.
    """
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{path or DEFAULT_PARAMS_FILE}: section '{section}' is missing")
    raw = data[section] or {}
    for key, value in (overrides or {}).items():
        set_dotted(raw, key.split("."), value)
    return from_dict(cls, raw, where=section)


def from_dict(cls: type[T], raw: Any, where: str = "") -> T:
    """Recursively build a (nested) dataclass from plain data, checking names and types."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(raw).__name__}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ParamsError(f"{where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain data, e.g. for logging to MLflow."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def params_hash(obj: Any) -> str:
    """A short stable hash of a params object (tags runs so equal configs are findable)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def parse_override(text: str) -> tuple[str, Any]:
    """``"gan.epochs=3"`` → ``("gan.epochs", 3)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ParamsError(f"override '{text}': expected KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def set_dotted(d: dict[str, Any], keys: list[str], value: Any) -> None:
    """`d[k0][k1]…[kn] = value`, making the inner mappings it needs."""
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    return value


def add_params_arguments(parser) -> None:
    """`--params FILE` and repeatable `--set SECTION.KEY=VALUE` for a stage command."""
    parser.add_argument(
        "--params",
        default=None,
        metavar="FILE",
        help="params file (default: params.yaml at the project root)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param of this stage's section, e.g. --set epochs=3 "
        "(value parsed as YAML; repeatable)",
    )


def params_from_args(args, cls: type[T], section: str) -> T:
    """The stage's params from `--params` and `--set` (see `add_params_arguments`)."""
    overrides = dict(parse_override(o) for o in getattr(args, "overrides", []) or [])
    prefix = section + "."
    overrides = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in overrides.items()}
    return load_section(cls, section, getattr(args, "params", None), overrides)

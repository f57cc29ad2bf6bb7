"""Reading, checking, shipping and documenting a `Config`: YAML files and dotted CLI overrides
into the dataclasses of `sections` (wrong keys and types are errors naming the field), plain
dicts for Ray workers (`to_dict`, without secrets), redacted copies for artefacts."""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from bco_ray.config.sections import Config, ConfigError

# ---------------------------------------------------------------------------- coercion

def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from YAML, or YAML-parsed CLI text) as type `tp`, or a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        # YAML 1.1 reads an unquoted `no` (train.mixed_precision's) as false: take the choice back.
        for a in args:
            if isinstance(value, bool) and isinstance(a, str) and yaml.safe_load(a) is value:
                return a
    elif origin in (list, tuple):
        if isinstance(value, list | tuple):
            items = [_coerce(v, args[0], where) for v in value] if args else list(value)
            return tuple(items) if origin is tuple else items
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, datetime.date):  # YAML reads 2026-11-02 as a date
            return value.isoformat()
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{where}'; {prefix.rstrip('.') or 'top level'} accepts: "
                              + ", ".join(names))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where + ".")
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Every value but the secrets (left at their defaults): what Ray tasks, actors and Serve
    deployments get, since their arguments are kept in the cluster's state. Workers take
    storage credentials from their environment (storage.credentials_to_environment);
    replicas get API keys as digests. Artefacts get `redacted(cfg)`."""
    return _secrets_replaced(cfg, lambda f, v: f.default)


REDACTED = "<redacted>"


def secret_keys() -> tuple[str, ...]:
    """The dotted names of the secret knobs (storage keys, API keys)."""
    cfg = Config()
    return tuple(f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))
                 if f.metadata.get("secret"))


def redacted(cfg) -> dict:
    """The config with the value of every secret knob that is set replaced by REDACTED:
    what manifests, run cards, MLflow params, reports and logs get."""
    return _secrets_replaced(cfg, lambda f, v: REDACTED if v else v)


def _secrets_replaced(cfg, value) -> dict:
    out = dataclasses.asdict(cfg)

    def walk(obj, d: dict) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.metadata.get("secret"):
                d[f.name] = value(f, v)
            elif dataclasses.is_dataclass(v):
                walk(v, d[f.name])
    walk(cfg, out)
    return out


def parse_overrides(argv: list[str]) -> dict:
    """`--a.b 1 --c.d=x` -> {"a": {"b": 1}, "c": {"d": "x"}}; values are parsed as YAML."""
    out: dict = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"expected an override like --section.key VALUE, got {tok!r}")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {tok} has no value")
            key, raw = tok[2:], argv[i + 1]
            i += 2
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier one")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=Config):
    """Defaults, then the YAML file (if any), then the dotted overrides; validated."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return _build(cls, data, "")


def from_dict(data: dict, cls=Config):
    """The inverse of `to_dict` (used to ship a config to Ray workers as plain data)."""
    return _build(cls, data, "")


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(redacted(cfg), sort_keys=False)


def docs_markdown(cls=Config) -> str:
    """The configuration reference (docs/configuration.md), generated from the dataclasses."""
    lines = ["# Configuration reference", "",
             "Generated from `bco_ray/config/sections.py` by `bco-ray config docs`; do not edit by hand.", "",
             "Set fields in a YAML file (`--config FILE`, one mapping per section) or on the command",
             "line with dotted overrides, which win: `--objective.beta 0.2` or `--objective.beta=0.2`.", ""]
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        lines += [f"## `{f.name}`: {sub.__doc__.strip().splitlines()[0]}", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        sub_hints = _hints(sub)
        for g in dataclasses.fields(sub):
            default = yaml.safe_dump(g.default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"| `{f.name}.{g.name}` | {_describe(sub_hints[g.name])} | `{default}` | "
                         f"{g.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)

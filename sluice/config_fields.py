"""How a config field is declared, described and checked: `option(...)` in the config
dataclasses (`sluice.config`) records a field's help, choices, flag name and bounds; `FieldSpec`
is that field as the CLI, `--config` files and `SLUICE_*` environment variables see it
(`sluice.config_sources` builds them from `field_specs_of`), with the type and range checks
`EngineConfig.validate` runs. No torch, no config classes: this module knows fields, not the
tree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import math
import types
import typing
from typing import Any

ENV_PREFIX = "SLUICE_"
"""Environment variables name config fields as ENV_PREFIX + the field name in upper case."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           flag: str | None = None, cli: bool = True, byte_size: bool = False,
           default_factory: Any = dataclasses.MISSING, ge: float | None = None,
           gt: float | None = None, le: float | None = None) -> Any:
    """Declare a config field with the metadata used to build CLI flags and validate values.

    `flag` overrides the generated `--field-name`; `cli=False` keeps a field out of the CLI and
    files (derived facts); `byte_size=True` accepts strings like "4GiB"; `ge`/`gt`/`le` bound a
    number (checked by `FieldSpec.check`).
    """
    meta = {"help": help, "choices": choices, "flag": flag, "cli": cli, "byte_size": byte_size,
            "ge": ge, "gt": gt, "le": le}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldSpec:
    """One config field as the CLI, files and environment see it.

    `kind` is one of "bool", "int", "float", "str", "tuple"; `optional` means None is allowed.
    """
    section: str
    name: str
    kind: str
    optional: bool
    default: Any
    help: str
    choices: tuple | None
    flag: str
    cli: bool
    byte_size: bool
    ge: float | None
    gt: float | None
    le: float | None

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def allowed(self) -> str:
        """What values are allowed, in words ("an integer >= 1", "one of fcfs, priority")."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.kind == "bool":
            return "true or false (also 1/0, yes/no, on/off)"
        if self.kind == "tuple":
            return "a comma-separated list of strings"
        if self.kind == "str":
            return "a string"
        if self.byte_size:
            return "a positive byte size such as 4GiB, 512MiB, 1.5GB or a plain number of bytes"
        noun = {"int": "an integer", "float": "a number"}[self.kind]
        return noun + _range_text(self.ge, self.gt, self.le)

    def check(self, value: Any) -> str | None:
        """Check an already-typed value; return why it is invalid, or None when it is fine."""
        if value is None:
            return None if self.optional else "must be set"
        expected = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,),
                    "tuple": (tuple,)}[self.kind]
        if not isinstance(value, expected) or (self.kind != "bool" and isinstance(value, bool)):
            return f"has the wrong type ({type(value).__name__})"
        if self.choices is not None and value not in self.choices:
            return "is not one of the choices"
        if self.kind in ("int", "float"):
            if isinstance(value, float) and math.isnan(value):
                return "is not a number"
            if ((self.ge is not None and value < self.ge)
                    or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le)):
                return "is out of range"
        return None


def _range_text(ge: float | None, gt: float | None, le: float | None) -> str:
    lo = f"[{ge:g}" if ge is not None else (f"({gt:g}" if gt is not None else None)
    if lo is not None and le is not None:
        return f" in {lo}, {le:g}]"
    if ge is not None:
        return f" >= {ge:g}"
    if gt is not None:
        return f" > {gt:g}"
    if le is not None:
        return f" <= {le:g}"
    return ""


def flag_name(f: dataclasses.Field) -> str:
    """The CLI flag of a config field: its `flag` metadata, else `--field-name`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _kind_of(hint: Any) -> tuple[str, bool]:
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1, f"unsupported config type {hint}"
        hint = rest[0]
    if typing.get_origin(hint) is tuple:
        return "tuple", optional
    names = {bool: "bool", int: "int", float: "float", str: "str"}
    assert hint in names, f"unsupported config type {hint}"
    return names[hint], optional


def field_specs_of(sections: dict[str, type]) -> dict[str, FieldSpec]:
    """Every field of the config dataclasses `sections` (section name -> class) by its name,
    in declaration order; a name declared twice is an error (flags and env vars are flat)."""
    specs: dict[str, FieldSpec] = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in specs, f"config field {f.name} is declared twice"
            kind, optional = _kind_of(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            m = f.metadata
            specs[f.name] = FieldSpec(
                section=section, name=f.name, kind=kind, optional=optional, default=default,
                help=m.get("help", ""), choices=m.get("choices"), flag=flag_name(f),
                cli=m.get("cli", True), byte_size=m.get("byte_size", False), ge=m.get("ge"),
                gt=m.get("gt"), le=m.get("le"))
    return specs

"""Where configuration comes from, and in which order it wins.

    overrides (python kwargs, e.g. LLM(max_num_seqs=4))  ┐ highest
    CLI flags (generated from config.py's fields)        ┘
    --config FILE (YAML or JSON; flat keys or nested by section)
    SLUICE_<FIELD_NAME> environment variables
    the field defaults in config.py                        lowest

Every flag, file key and environment variable is derived from the `option(...)` declarations in
`config.py` (`field_specs()`); there is no second list. A value that is `None` in `cli_args` or
`overrides` means "not given". Strings (env, CLI, files) are parsed per field type: booleans
(true/false, 1/0, yes/no, on/off), byte sizes ("4GiB", "1.5GB"), comma-separated tuples.

Validation collects every problem (bad types, choices, ranges, unknown file keys with a
"did you mean", unsupported values, cross-field rules) and raises them together in one
`ConfigError`; each line names the flag, the value and where it came from, what is allowed and
how to fix it. Unknown `SLUICE_*` variables only log a warning. No torch.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sluice.config import SECTIONS, EngineConfig, field_specs
from sluice.config_fields import ENV_PREFIX, FieldSpec
from sluice.config_rules import cross_field_problems
from sluice.errors import ConfigError

logger = logging.getLogger(__name__)

FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "tensor_parallel_size": ("-tp",), "pipeline_parallel_size": ("-pp",),
    "data_parallel_size": ("-dp",), "data_parallel_rank": ("-dpn",),
}
"""Extra option strings (vLLM's short names) per field."""

NEGATED_FLAGS: dict[str, str] = {"disable_log_requests": "--enable-log-requests"}
"""Boolean fields with an extra flag that sets them to False (vLLM's spelling of the opposite
switch); `--no-<flag>` works as well."""

CHOICE_ALIASES: dict[str, dict[str, str]] = {
    "dtype": {"half": "float16", "float": "float32", "fp16": "float16", "fp32": "float32",
              "bf16": "bfloat16"},
    "kv_cache_dtype": {"half": "float16", "float": "float32", "fp16": "float16",
                       "fp32": "float32", "bf16": "bfloat16", "fp8": "fp8_e4m3"},
}
"""Other spellings (vLLM's) of a field's choices, mapped to the one the config stores."""

CONFIG_FILE_ENV = "SLUICE_CONFIG"
"""Names a config file when `--config` is not given."""

ENGINE_STARTUP_TIMEOUT_ENV = "SLUICE_ENGINE_STARTUP_TIMEOUT"  # seconds; read by engine/launch.py
EXECUTE_MODEL_TIMEOUT_ENV = "SLUICE_EXECUTE_MODEL_TIMEOUT"  # seconds; read by executor/multiproc.py
NODE_TIMEOUT_ENV = "SLUICE_NODE_TIMEOUT"  # seconds; read by executor/nodes.py (--nnodes > 1)
RUNTIME_LORA_ENV = "SLUICE_ALLOW_RUNTIME_LORA_UPDATING"  # 1: /v1/(un)load_lora_adapter routes
CACHE_DIR_ENV = "SLUICE_CACHE_DIR"  # GGUF sidecars; read by model_spec/gguf.py
CPU_KERNELS_ENV = "SLUICE_CPU_KERNELS"  # the kernel build to load; read by platform/cpu_kernels.py
OTHER_ENV_VARS: frozenset[str] = frozenset({CONFIG_FILE_ENV, ENGINE_STARTUP_TIMEOUT_ENV,
                                            EXECUTE_MODEL_TIMEOUT_ENV, NODE_TIMEOUT_ENV,
                                            RUNTIME_LORA_ENV, CACHE_DIR_ENV, CPU_KERNELS_ENV})
"""`SLUICE_*` variables that are not config fields but are known (not warned about). Modules that
read their own `SLUICE_*` variable add its name here."""

MODEL_POSITIONAL_DEST = "model_positional"
SECRET_FIELDS = ("api_key", "hf_token")
"""Fields never printed in logs (`flat_config` redacts them)."""


def default_model_path() -> Path:
    """The built-in demo model directory (`sluice/assets/demo_model`); it may not exist, and its
    existence is checked by `hf_config` when loading, not here."""
    return Path(__file__).resolve().parent / "assets" / "demo_model"


DEMO_MODEL_NAME = "sluice-demo"
"""The name the API serves the built-in demo model under."""


# ---------------------------------------------------------------------------------------------
# Parsing values

_TRUE = frozenset({"true", "1", "yes", "y", "on", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "off", "f"})
_BYTE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _BYTE_UNITS.update({_p: 1024 ** _i, _p + "i": 1024 ** _i, _p + "ib": 1024 ** _i,
                        _p + "b": 1000 ** _i})
_BYTE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]\+?(\d+))?\s*([A-Za-z]*)\s*$")


def parse_bool(text: str) -> bool:
    """Parse "true/false, 1/0, yes/no, on/off" (any case); raise ValueError otherwise."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_byte_size(text: str | int | float) -> int:
    """Parse a byte size: a plain number of bytes, or a number with a unit. Binary units
    (KiB, MiB, GiB, TiB, and the bare K/M/G/T) are powers of 1024; decimal ones (KB, MB, GB, TB)
    powers of 1000. "1.5GB" == 1_500_000_000. Raise ValueError for anything else."""
    if isinstance(text, bool):
        raise ValueError("a boolean is not a byte size")
    if isinstance(text, (int, float)):
        if isinstance(text, float) and not text.is_integer():
            raise ValueError(f"not a whole number of bytes: {text}")
        return int(text)
    m = _BYTE_RE.match(text)
    if m is None or m.group(3).lower() not in _BYTE_UNITS:
        raise ValueError(f"not a byte size: {text!r}")
    number = float(m.group(1)) * 10 ** int(m.group(2) or 0)
    mult = _BYTE_UNITS[m.group(3).lower()]
    if mult == 1 and not number.is_integer():
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(round(number * mult))


class _BadValue(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_bool(spec: FieldSpec, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    try:
        if isinstance(raw, str):
            return parse_bool(raw)
    except ValueError:
        pass
    raise _BadValue("is not a boolean")


def _to_tuple(spec: FieldSpec, raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str) and raw.strip().startswith("["):  # a JSON list, as vLLM takes
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise _BadValue("is not a valid JSON list") from None
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
        # space-separated flag values (nargs="+") may each still be comma separated, except
        # a JSON object (vLLM's --lora-modules '{"name": ..., "path": ...}'), kept whole
        return tuple(part.strip() for item in raw
                     for part in ([item] if item.strip().startswith("{") else item.split(","))
                     if part.strip())
    raise _BadValue("is not a list of strings")


def _to_str(spec: FieldSpec, raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and spec.name.endswith("_config"):
        return json.dumps(raw)   # a JSON-object option given as a mapping (LLM(...), YAML)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)  # e.g. `api_key: 12345` in YAML
    raise _BadValue("is not a string")


def _to_number(spec: FieldSpec, raw: Any) -> int | float:
    noun = "an integer" if spec.kind == "int" else "a number"
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise _BadValue(f"is not {noun}")
    try:
        if spec.kind == "float":
            return float(raw)
        if spec.byte_size:
            return parse_byte_size(raw)
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, float):
            raise ValueError(raw)
        return int(raw)
    except ValueError:
        raise _BadValue("is not a valid byte size" if spec.byte_size else f"is not {noun}") \
            from None


_CONVERTERS = {"bool": _to_bool, "tuple": _to_tuple, "str": _to_str, "int": _to_number,
               "float": _to_number}


def _convert(spec: FieldSpec, raw: Any) -> Any:
    """Turn a raw value (string, or a typed value from YAML/JSON/python) into the field's type;
    "none"/"null" strings mean None for optional non-string fields."""
    if (spec.optional and spec.kind != "str" and isinstance(raw, str)
            and raw.strip().lower() in ("none", "null")):
        return None
    return _CONVERTERS[spec.kind](spec, raw)


def coerce_value(spec: FieldSpec, raw: Any) -> Any:
    """Parse `raw` for `spec` and check its choices and range; raise `_BadValue(reason)`."""
    value = _convert(spec, raw)
    if (spec.choices is not None and isinstance(value, str) and value not in spec.choices
            and value.lower() in spec.choices):
        value = value.lower()
    if isinstance(value, str):
        value = CHOICE_ALIASES.get(spec.name, {}).get(value.lower(), value)
    reason = spec.check(value)
    if reason is not None:
        raise _BadValue(reason)
    return value


# ---------------------------------------------------------------------------------------------
# Sources

@dataclass(frozen=True)
class Given:
    """One raw value and where it came from. `source` is "cli", "override", "file" or "env";
    `key` is the flag, kwarg name, file key path or variable name; `path` the config file."""
    value: Any
    source: str
    key: str
    path: str = ""

    def where(self) -> str:
        return {"cli": "on the command line", "override": f"from keyword argument {self.key}=",
                "file": f"from key '{self.key}' in {self.path}",
                "env": f"from environment variable {self.key}"}[self.source]

    def fix(self, spec: FieldSpec) -> str:
        dflt = "" if spec.default in (None, ()) else f" ({_show(spec.default)})"
        return {"cli": f"pass {spec.flag} with an allowed value, or leave it out to use the "
                       f"default{dflt}",
                "override": f"pass {spec.name}= with an allowed value, or leave it out to use "
                            f"the default{dflt}",
                "file": f"change '{self.key}' in {self.path} to an allowed value, or delete it "
                        f"to use the default{dflt}",
                "env": f"set {self.key} to an allowed value, or unset it to use the "
                       f"default{dflt}"}[self.source]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value) or "empty"
    return str(value)


def _value_problem(spec: FieldSpec, given: Given, reason: str) -> str:
    return (f"{spec.flag}: {given.value!r} {given.where()} {reason}; allowed: {spec.allowed()}. "
            f"Fix: {given.fix(spec)}.")


def _normalize_key(key: Any) -> str:
    return str(key).strip().lstrip("-").replace("-", "_").lower()


def closest_option(key: str, *, sections: bool = False) -> str | None:
    """The option name (or, with `sections`, section name) closest to `key`, if any is close."""
    candidates = [n for n, s in field_specs().items() if s.cli]
    match = difflib.get_close_matches(_normalize_key(key), candidates + (
        list(SECTIONS) if sections else []), n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(key: str, *, sections: bool = False) -> str:
    """" did you mean --flag?" for the closest option name (or section), else ""."""
    name = closest_option(key, sections=sections)
    if name is None:
        return ""
    specs = field_specs()
    return f" did you mean {specs[name].flag}?" if name in specs else \
        f" did you mean section '{name}'?"


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON config file (JSON when it ends in .json, else YAML, which also reads
    JSON) into a mapping; raise ConfigError naming the file and the problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config: file '{p}' does not exist. Fix: pass the path of a YAML "
                          "or JSON file of engine options.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config: cannot read '{p}': {e}. Fix: pass a readable UTF-8 YAML "
                          "or JSON file.") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config: '{p}' is not valid JSON: {e}. Fix: correct the file "
                              "syntax.") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            detail = " ".join(str(e).split())
            raise ConfigError(f"--config: '{p}' is not valid YAML: {detail}. Fix: correct the "
                              "file syntax.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: '{p}' must hold a mapping of option names to values, "
                          f"found a {type(data).__name__}. Fix: write e.g. 'max_num_seqs: 8'.")
    return data


def _from_file(path: str, problems: list[str]) -> dict[str, Given]:
    try:
        data = load_config_file(path)
    except ConfigError as e:
        problems.extend(e.problems)
        return {}
    specs = field_specs()
    out: dict[str, Given] = {}

    def unknown(keypath: str, name: str, section_too: bool) -> None:
        problems.append(f"--config {path}: unknown key '{keypath}';"
                        f"{did_you_mean(name, sections=section_too) or ' no such option.'} "
                        "Fix: rename or delete it (`sluice serve --help` lists every option).")

    def put(name: str, value: Any, keypath: str) -> None:
        if name in out:
            problems.append(f"--config {path}: '{keypath}' and '{out[name].key}' both set "
                            f"{specs[name].flag}. Fix: keep only one of them.")
        elif value is not None:
            out[name] = Given(value, "file", keypath, str(path))

    for key, value in data.items():
        norm = _normalize_key(key)
        spec = specs.get(norm)
        if isinstance(value, dict) and norm in SECTIONS:
            for sub_key, sub_value in value.items():
                sub = _normalize_key(sub_key)
                sub_spec = specs.get(sub)
                keypath = f"{key}.{sub_key}"
                if sub_spec is None or not sub_spec.cli:
                    unknown(keypath, sub, False)
                elif sub_spec.section != norm:
                    problems.append(
                        f"--config {path}: key '{keypath}': {sub_spec.flag} belongs to section "
                        f"'{sub_spec.section}', not '{norm}'. Fix: move it under "
                        f"'{sub_spec.section}:' or write it at the top level.")
                else:
                    put(sub, sub_value, keypath)
        elif spec is not None and spec.cli:
            put(norm, value, str(key))
        else:
            unknown(str(key), norm, isinstance(value, dict))
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Given]:
    specs = field_specs()
    out: dict[str, Given] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in OTHER_ENV_VARS:
            continue
        name = var[len(ENV_PREFIX):].lower()
        spec = specs.get(name)
        if spec is None or not spec.cli:
            near = closest_option(name)
            hint = f" (did you mean {specs[near].env_var}?)" if near else ""
            logger.warning("Ignoring environment variable %s: it is not a sluice option%s.",
                           var, hint)
        elif env[var].strip() != "":  # an empty variable counts as unset
            out[name] = Given(env[var], "env", var)
    return out


def _from_mapping(values: Mapping[str, Any], source: str, problems: list[str]
                  ) -> dict[str, Given]:
    specs = field_specs()
    out: dict[str, Given] = {}
    for key, value in values.items():
        name = _normalize_key(key)
        spec = specs.get(name)
        if spec is None or (source == "cli" and not spec.cli):
            what = "engine argument" if source == "override" else "option"
            problems.append(f"unknown {what} '{key}';{did_you_mean(name) or ' no such option.'}"
                            " Fix: correct or remove it.")
        elif value is not None:
            flag_key = spec.flag if source == "cli" else spec.name
            out[name] = Given(value, source, flag_key)
    return out


def build_engine_config(cli_args: dict[str, Any] | None = None, config_file: str | None = None,
                        env: Mapping[str, str] | None = None,
                        overrides: dict[str, Any] | None = None) -> EngineConfig:
    """Merge overrides/CLI > config file > SLUICE_* env > defaults into a validated config.

    `cli_args` and `overrides` are flat field names (snake or kebab case) → values (strings or
    typed); None means "not given" (overrides win over cli_args). `config_file` defaults to
    $SLUICE_CONFIG. `env` defaults to os.environ. A `model` left unset becomes
    `default_model_path()`, served as `sluice-demo`. Raises one ConfigError listing every problem.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    layers = [_from_env(env)]
    config_file = config_file or env.get(CONFIG_FILE_ENV) or None
    if config_file:
        layers.append(_from_file(str(config_file), problems))
    layers.append(_from_mapping(cli_args or {}, "cli", problems))
    layers.append(_from_mapping(overrides or {}, "override", problems))
    chosen: dict[str, Given] = {}
    for layer in layers:
        chosen.update(layer)

    specs = field_specs()
    values: dict[str, Any] = {}
    bad: set[str] = set()
    for name, spec in specs.items():
        if name in chosen:
            try:
                values[name] = coerce_value(spec, chosen[name].value)
            except _BadValue as e:
                bad.add(name)
                problems.append(_value_problem(spec, chosen[name], e.reason))
    if values.get("model") is None:
        values["model"] = str(default_model_path())
        if not values.get("served_model_name"):
            values["served_model_name"] = (DEMO_MODEL_NAME,)
    if not values.get("served_model_name") and "model" not in bad:
        values["served_model_name"] = (values["model"],)  # as vLLM: the model as given
    cfg = EngineConfig(**{
        section: cls(**{n: v for n, v in values.items() if specs[n].section == section})
        for section, cls in SECTIONS.items()})
    problems += cross_field_problems(cfg, skip=bad)
    if problems:
        raise ConfigError(problems)
    return cfg


def flat_config(cfg: EngineConfig, *, redact: bool = True) -> dict[str, Any]:
    """The config as one flat {field_name: value} dict (for logs); secrets (`api_key`,
    `hf_token`) shown as '***'."""
    flat = {k: v for section in asdict(cfg).values() for k, v in section.items()}
    for secret in SECRET_FIELDS:
        if redact and flat.get(secret):
            flat[secret] = "***"
    return flat


# ---------------------------------------------------------------------------------------------
# argparse

def _metavar(spec: FieldSpec) -> str:
    if spec.choices is not None:
        return "{" + ",".join(str(c) for c in spec.choices) + "}"
    if spec.byte_size:
        return "BYTES"
    return {"int": "N", "float": "FRACTION" if spec.le == 1 else "X",
            "tuple": "A,B,..."}.get(spec.kind, spec.name.split("_")[-1].upper())


def _flag_help(spec: FieldSpec) -> str:
    parts = [spec.help.rstrip()]
    if spec.default not in (None, ()):
        parts.append(f"[default: {_show(spec.default)}]")
    parts.append(f"[env: {spec.env_var}]")
    return " ".join(parts).replace("%", "%%")


def add_engine_args(parser: argparse.ArgumentParser, sections: Iterable[str] | None = None, *,
                    positional_model: bool = False) -> argparse.ArgumentParser:
    """Add `--config FILE` and one flag per config field of `sections` (default: all), one
    argument group per section. Every flag defaults to None ("not given"); bools get
    `--x/--no-x`. `positional_model=True` also accepts MODEL as an optional positional."""
    wanted = list(SECTIONS) if sections is None else list(sections)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; choose from {list(SECTIONS)}")
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML or JSON file of engine options: flat keys (max_num_seqs: 8) or nested by "
             "section (cache: {block_size: 32}). Precedence: flags > --config > SLUICE_* "
             f"environment variables > defaults. [env: {CONFIG_FILE_ENV}]")
    if positional_model:
        parser.add_argument(MODEL_POSITIONAL_DEST, nargs="?", metavar="MODEL", default=None,
                            help="Model directory (same as --model).")
    for section in wanted:
        group = parser.add_argument_group(f"{section} options")
        for spec in field_specs().values():
            if spec.section != section or not spec.cli:
                continue
            names = [spec.flag, *FLAG_ALIASES.get(spec.name, ())]
            if spec.kind == "bool":
                group.add_argument(*names, dest=spec.name, default=None, help=_flag_help(spec),
                                   action=argparse.BooleanOptionalAction)
                if spec.name in NEGATED_FLAGS:
                    group.add_argument(NEGATED_FLAGS[spec.name], dest=spec.name,
                                       action="store_const", const=False,
                                       help=f"Same as --no-{spec.flag[2:]}.")
            elif spec.kind == "tuple":  # vLLM style: --served-model-name a b (or a,b)
                group.add_argument(*names, dest=spec.name, default=None, help=_flag_help(spec),
                                   metavar=spec.name.split("_")[-1].upper(), nargs="+")
            else:
                group.add_argument(*names, dest=spec.name, default=None, help=_flag_help(spec),
                                   metavar=_metavar(spec))
    return parser


def engine_config_from_args(namespace: argparse.Namespace) -> EngineConfig:
    """Build the validated config from a namespace produced by a parser set up with
    `add_engine_args` (flags given on the command line win over --config and SLUICE_*)."""
    cli = {name: getattr(namespace, name) for name in field_specs()
           if getattr(namespace, name, None) is not None}
    positional = getattr(namespace, MODEL_POSITIONAL_DEST, None)
    if positional is not None:
        if cli.get("model") not in (None, positional):
            raise ConfigError(f"--model: the positional MODEL ({positional!r}) and --model "
                              f"({cli['model']!r}) disagree. Fix: give the model only once.")
        cli["model"] = positional
    return build_engine_config(cli_args=cli, config_file=getattr(namespace, "config", None))

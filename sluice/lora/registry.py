"""`LoRARegistry`: the frontend's adapters by name (API-server side; no torch).

OpenAI clients name an adapter as `model`; the registry turns that name into the
`LoRARequest` the engine receives. Ids are assigned from 1 in order of registration and never
reused, so a name unloaded and loaded again (perhaps from another path) gets a new id: its
prefix-cache blocks and the workers' cached weights of the old adapter are never mistaken for
the new one's. `--lora-modules` entries are registered at startup (`from_config`), each checked
with `sluice.lora.peft.check_adapter` (a bad one fails startup naming it); `/v1/load_lora_adapter`
and `/v1/unload_lora_adapter` change it at runtime.

Removing a name affects only later requests: a request that already holds its `LoRARequest`
runs to the end (the workers keep the adapter's weights in their LRU cache, and reload them
from the path if evicted meanwhile).

Thread safety: `add` may run on a worker thread (the check reads files) while the event loop
reads names; one lock guards the maps, and `add` re-checks the name under it after checking the
files, so two concurrent loads of one name cannot both succeed.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from sluice.errors import ConfigError, InvalidRequestError, NotFoundError
from sluice.lora.request import LoRARequest

if TYPE_CHECKING:
    from sluice.config import EngineConfig


@dataclass(frozen=True)
class LoRAModule:
    """One `--lora-modules` entry: `name=path` or vLLM's JSON form."""
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(entry: str) -> LoRAModule:
    """`'name=path'` or `'{"name": ..., "path": ..., "base_model_name": ...}'` (vLLM's forms);
    raises `ConfigError` naming the entry."""
    text = entry.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--lora-modules {entry!r}: not valid JSON ({e.msg}).") from None
        unknown = set(data) - {"name", "path", "base_model_name"}
        if unknown or not isinstance(data.get("name"), str) or not isinstance(data.get("path"),
                                                                              str):
            raise ConfigError(
                f"--lora-modules {entry!r}: the JSON form needs string keys 'name' and 'path' "
                f"(and optionally 'base_model_name')"
                + (f"; unknown keys: {', '.join(sorted(unknown))}." if unknown else "."))
        base = data.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"--lora-modules {entry!r}: 'base_model_name' must be a string.")
        name, path = data["name"], data["path"]
    else:
        name, sep, path = text.partition("=")
        base = None
        if not sep:
            raise ConfigError(f"--lora-modules {entry!r}: expected 'name=path' or vLLM's JSON "
                              "form '{\"name\": ..., \"path\": ...}'.")
    if not name.strip() or not path.strip():
        raise ConfigError(f"--lora-modules {entry!r}: both the name and the path must be "
                          "non-empty.")
    return LoRAModule(name.strip(), path.strip(), base)


class LoRARegistry:
    """Adapter name -> `LoRARequest` (see the module docstring).

    `check(path)` validates an adapter directory (raising `InvalidRequestError`); the default,
    built by `for_model`, is `check_adapter` against the base model's spec. `reserved` are
    names an adapter may not take (the base model's served names).
    """

    def __init__(self, check: Callable[[str], object], reserved: Iterable[str] = ()):
        self._check = check
        self._reserved = frozenset(reserved)
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model_dir: str, max_lora_rank: int,
                  reserved: Iterable[str] = ()) -> "LoRARegistry":
        """A registry checking adapters against the model in `model_dir` (its config.json)."""
        from sluice.hf_config import load_model_spec
        from sluice.lora.peft import check_adapter
        spec = load_model_spec(model_dir)
        return cls(lambda path: check_adapter(path, spec, max_lora_rank), reserved)

    def load_modules(self, entries: Iterable[str]) -> None:
        """Register `--lora-modules` entries; a bad one raises `ConfigError` naming it."""
        for entry in entries:
            module = parse_lora_module(entry)
            try:
                self.add(module.name, module.path, module.base_model_name)
            except InvalidRequestError as e:
                raise ConfigError(f"--lora-modules {module.name}={module.path}: "
                                  f"{e.message}") from None

    def add(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        """Check the adapter at `path`, then register it under `name` with a fresh id.
        Raises `InvalidRequestError` for a bad adapter (param "lora_path"), a name in use or a
        reserved one (param "lora_name")."""
        self._check_name_free(name)
        self._check(path)
        with self._lock:
            self._check_name_free(name)   # again: another load may have won meanwhile
            request = LoRARequest(name, next(self._ids), path, base_model_name)
            self._by_name[name] = request
        return request

    def remove(self, name: str) -> LoRARequest:
        """Unregister `name`; `NotFoundError` (404) when no adapter has it."""
        with self._lock:
            request = self._by_name.pop(name, None)
        if request is None:
            raise NotFoundError(f"The lora adapter '{name}' cannot be found.", param="lora_name")
        return request

    def get(self, name: str) -> LoRARequest | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[LoRARequest]:
        """The adapters, in order of registration."""
        with self._lock:
            return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def _check_name_free(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("lora_name must be a non-empty string.", param="lora_name")
        if name in self._reserved:
            raise InvalidRequestError(f"'{name}' is the base model's name; choose another name "
                                      "for the adapter.", param="lora_name")
        if name in self._by_name:
            raise InvalidRequestError(f"The lora adapter '{name}' has already been loaded.",
                                      param="lora_name")


def registry_from_config(config: "EngineConfig",
                         served_names: Iterable[str] = ()) -> LoRARegistry | None:
    """The server's registry with the `--lora-modules` adapters (each checked; `ConfigError`
    naming a bad one), or None without --enable-lora (where --lora-modules is an error)."""
    lora = config.lora
    if not lora.enable_lora:
        if lora.lora_modules:
            raise ConfigError("--lora-modules needs --enable-lora (adapters are served only "
                              "with LoRA enabled).")
        return None
    registry = LoRARegistry.for_model(config.model.model, lora.max_lora_rank, served_names)
    registry.load_modules(lora.lora_modules)
    return registry


class AdapterValidator:
    """Checks the `LoRARequest`s that callers build themselves (offline `LLM`, `AsyncLLM`):
    each adapter once (`check(path)`, as `LoRARegistry`), and that one `lora_int_id` always
    names the same adapter path (the id keys the prefix cache and the workers' weights).
    Raises `InvalidRequestError` (a ValueError) with param "lora_request"."""

    def __init__(self, check: Callable[[str], object]):
        self._check = check
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model_dir: str, max_lora_rank: int) -> "AdapterValidator":
        """Checks against the model in `model_dir` (its config is read on the first check)."""
        import functools

        from sluice.hf_config import load_model_spec
        from sluice.lora.peft import check_adapter
        spec = functools.cache(lambda: load_model_spec(model_dir))
        return cls(lambda path: check_adapter(path, spec(), max_lora_rank))

    def validate(self, lora_request: LoRARequest) -> None:
        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError(
                f"lora_request must be a sluice.lora.request.LoRARequest, got "
                f"{type(lora_request).__name__}.", param="lora_request")
        lora_id, path = lora_request.lora_int_id, lora_request.lora_path
        known = self._paths.get(lora_id)
        if known == path:
            return
        if known is not None:
            raise InvalidRequestError(
                f"lora_int_id {lora_id} already names the adapter at {known!r}; give the "
                f"adapter at {path!r} ({lora_request.lora_name!r}) another id.",
                param="lora_request")
        self._check(path)
        with self._lock:
            self._paths.setdefault(lora_id, path)


def validator_from_config(config: "EngineConfig") -> AdapterValidator | None:
    """The `AdapterValidator` of an engine with --enable-lora; None without."""
    if not config.lora.enable_lora:
        return None
    return AdapterValidator.for_model(config.model.model, config.lora.max_lora_rank)


def check_lora_request(validator: AdapterValidator | None,
                       lora_request: LoRARequest | None) -> None:
    """None passes (the base model); an adapter needs LoRA on (`validator` from
    `validator_from_config`) and a valid adapter, else `InvalidRequestError` (a ValueError)."""
    if lora_request is None:
        return
    if validator is None:
        name = getattr(lora_request, "lora_name", lora_request)
        raise InvalidRequestError(
            f"lora_request {name!r}: LoRA adapters need an engine started with --enable-lora "
            "(offline: LLM(..., enable_lora=True)).", param="lora_request")
    validator.validate(lora_request)

"""`--kv-events-config`: a JSON object with vLLM's `KVEventsConfig` keys.

    {"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",
     "replay_endpoint": "tcp://*:5558", "buffer_steps": 10000, "hwm": 100000,
     "max_queue_size": 100000, "topic": ""}

An endpoint with `*` (or ipc://, inproc://) is bound, any other is connected to (vLLM's rule).
`publisher` defaults to "zmq" when events are enabled, "null" otherwise. Unknown keys and wrong
types are refused with the key's name (`ConfigError`). No torch, no zmq.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.config_json import decode_json_object
from sluice.errors import ConfigError

FLAG = "--kv-events-config"
PUBLISHERS = ("null", "zmq")


@dataclass(frozen=True)
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def publisher_kind(self) -> str:
        """"zmq" or "null", with the default resolved."""
        if self.publisher is not None:
            return self.publisher
        return "zmq" if self.enable_kv_cache_events else "null"

    @property
    def enabled(self) -> bool:
        """Whether events are recorded and published at all."""
        return self.enable_kv_cache_events and self.publisher_kind != "null"


_TYPES: dict[str, tuple[type, ...]] = {
    "enable_kv_cache_events": (bool,), "publisher": (str, type(None)), "endpoint": (str,),
    "replay_endpoint": (str, type(None)), "buffer_steps": (int,), "hwm": (int,),
    "max_queue_size": (int,), "topic": (str,),
}


def parse_kv_events_config(text: str | dict | None) -> KVEventsConfig | None:
    """The config in `text` (JSON, or an already decoded dict); None when `text` is None.
    Raises `ConfigError` naming the offending key."""
    if text is None:
        return None
    data = decode_json_object(FLAG, text, '{"enable_kv_cache_events": true, "endpoint": '
                              '"tcp://*:5557"}', _TYPES)
    problems = []
    if data.get("publisher") not in (None, *PUBLISHERS):
        problems.append(f"{FLAG}: publisher {data['publisher']!r} is not one of "
                        f"{', '.join(PUBLISHERS)}.")
    for key in ("buffer_steps", "hwm", "max_queue_size"):
        if key in data and data[key] < (1 if key == "buffer_steps" else 0):
            problems.append(f"{FLAG}: {key} {data[key]} is out of range.")
    if problems:
        raise ConfigError(problems)
    return KVEventsConfig(**data)

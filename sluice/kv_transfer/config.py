"""`--kv-transfer-config`: a JSON object with vLLM's `KVTransferConfig` keys.

    {"kv_connector": "ZmqPullConnector", "kv_role": "kv_producer", "kv_ip": "127.0.0.1",
     "kv_port": 14579, "engine_id": "prefill-0",
     "kv_connector_extra_config": {"lease_seconds": 30, "transfer_timeout_seconds": 10}}

`kv_role`: kv_producer (a prefill engine: it serves its blocks), kv_consumer (a decode engine: it
pulls them) or kv_both. `kv_ip`/`kv_port`: where a producer's worker binds its block server
(tensor-parallel rank r and data-parallel rank d use kv_port + d * tp + r) and the host it
advertises in `kv_transfer_params`. Unknown keys, wrong types and unknown values are refused
with the key's name (`ConfigError`). No torch, no zmq.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from sluice.config_json import decode_json_object
from sluice.errors import ConfigError

FLAG = "--kv-transfer-config"
ROLES = ("kv_producer", "kv_consumer", "kv_both")
DEFAULT_PORT = 14579

# kv_connector_extra_config keys: name -> (types, default, lower bound (exclusive), meaning)
EXTRA_KEYS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "lease_seconds": ((int, float), 30.0,
                      "seconds a producer holds a finished request's blocks for the consumer"),
    "transfer_timeout_seconds": ((int, float), 10.0,
                                 "seconds a consumer waits for one pull before recomputing"),
    "advertise_host": ((str,), None, "host put in kv_transfer_params (default: kv_ip, or this "
                                     "machine's address when kv_ip is 0.0.0.0)"),
}


@dataclass(frozen=True)
class KVTransferConfig:
    kv_connector: str
    kv_role: str
    kv_ip: str = "127.0.0.1"
    kv_port: int = DEFAULT_PORT
    engine_id: str | None = None
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def extra(self, key: str) -> Any:
        return self.kv_connector_extra_config.get(key, EXTRA_KEYS[key][1])

    @property
    def lease_seconds(self) -> float:
        return float(self.extra("lease_seconds"))

    @property
    def transfer_timeout_seconds(self) -> float:
        return float(self.extra("transfer_timeout_seconds"))

    @property
    def resolved_engine_id(self) -> str:
        return self.engine_id or f"{self.advertised_host}:{self.kv_port}"

    @property
    def advertised_host(self) -> str:
        host = self.extra("advertise_host")
        if host:
            return host
        if self.kv_ip in ("0.0.0.0", "::", "*"):
            return socket.gethostbyname(socket.gethostname())
        return self.kv_ip

    def port_for(self, tp_rank: int, tp_size: int, dp_rank: int = 0) -> int:
        """The block-server port of one worker: kv_port + dp_rank * tp_size + tp_rank."""
        return self.kv_port + dp_rank * tp_size + tp_rank


_TYPES: dict[str, tuple[type, ...]] = {
    "kv_connector": (str,), "kv_role": (str,), "kv_ip": (str,), "kv_port": (int,),
    "engine_id": (str, type(None)), "kv_connector_extra_config": (dict,),
}


def parse_kv_transfer_config(text: str | dict | None) -> KVTransferConfig | None:
    """The config in `text` (JSON, or an already decoded dict); None when `text` is None.
    Raises `ConfigError` naming the offending key."""
    if text is None:
        return None
    data = decode_json_object(FLAG, text, '{"kv_connector": "ZmqPullConnector", "kv_role": '
                              '"kv_producer"}', _TYPES)
    problems = []
    for key in ("kv_connector", "kv_role"):
        if key not in data:
            problems.append(f"{FLAG}: {key} is required.")
    if problems:
        raise ConfigError(problems)
    from sluice.kv_transfer.factory import connector_names
    if data["kv_connector"] not in connector_names():
        problems.append(f"{FLAG}: unknown kv_connector {data['kv_connector']!r}; known: "
                        f"{', '.join(connector_names())}.")
    if data["kv_role"] not in ROLES:
        problems.append(f"{FLAG}: kv_role {data['kv_role']!r} is not one of {', '.join(ROLES)}.")
    port = data.get("kv_port", DEFAULT_PORT)
    if not 1 <= port <= 65535:
        problems.append(f"{FLAG}: kv_port {port} is out of range (1-65535).")
    for key, value in data.get("kv_connector_extra_config", {}).items():
        if key not in EXTRA_KEYS:
            problems.append(f"{FLAG}: unknown kv_connector_extra_config key {key!r}; known: "
                            f"{', '.join(EXTRA_KEYS)}.")
            continue
        types = EXTRA_KEYS[key][0]
        if isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"{FLAG}: kv_connector_extra_config.{key} has the wrong type "
                            f"({type(value).__name__}: {value!r}).")
        elif types != (str,) and not value > 0:
            problems.append(f"{FLAG}: kv_connector_extra_config.{key} must be > 0, got {value}.")
    if problems:
        raise ConfigError(problems)
    return KVTransferConfig(**data)

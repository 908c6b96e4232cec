"""The frontend ⇄ engine-core-process wire protocol: message tags and msgspec codecs. No torch.

Every ZeroMQ message is two frames, `[tag, payload]`: one byte naming the message type, then a
msgspec-msgpack body (never pickle). Requests flow frontend → engine (PUSH → PULL):

    ADD       EngineCoreRequest            ABORT     list[str] (engine request ids)
    UTILITY   UtilityRequest               SHUTDOWN  b"" (finish the loop, exit 0)

and outputs flow engine → frontend (PUSH → PULL):

    OUTPUTS         EngineCoreOutputs (one engine step)
    UTILITY_RESULT  UtilityResult (answers one UtilityRequest by `call_id`)
    ENGINE_DEAD     EngineFailure (the busy loop raised; the process exits right after)

The startup handshake (child → parent, over a multiprocessing pipe as raw bytes) is one
`HandshakeReady` or `HandshakeFailed`. Utility calls are a closed set of typed methods
(`UtilityMethod`), not string RPC.
"""

from __future__ import annotations

import enum
import traceback
from typing import Any, Sequence

import msgspec

from sluice.messages import EngineCoreOutputs, EngineCoreRequest, EngineReady


class RequestType(enum.IntEnum):
    ADD = 0
    ABORT = 1
    UTILITY = 2
    SHUTDOWN = 3


class OutputType(enum.IntEnum):
    OUTPUTS = 0
    UTILITY_RESULT = 1
    ENGINE_DEAD = 2


class UtilityMethod(enum.IntEnum):
    """Out-of-band calls answered by the busy loop between steps (`arg` / `value` of the
    request and result as noted)."""
    PING = 0                # health round trip; value 0
    RESET_PREFIX_CACHE = 1  # drop cached prefix blocks; value 1 done, 0 refused (blocks in use)
    SLEEP = 2               # arg: level 1 (free the KV cache) or 2 (and the weights); value 0;
    #                         error "EngineBusyError: ..." while requests are unfinished
    WAKE_UP = 3             # reallocate (and reload) what SLEEP freed; value 0
    IS_SLEEPING = 4         # value: the sleep level, 0 when awake


class UtilityRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    method: UtilityMethod
    arg: int = 0


class UtilityResult(msgspec.Struct, array_like=True, omit_defaults=True):
    """`error` is empty on success; otherwise "<ExceptionType>: <message>". `value` is the
    method's answer (see `UtilityMethod`)."""
    call_id: int
    error: str = ""
    value: int = 0


class EngineFailure(msgspec.Struct, omit_defaults=True):
    """An exception raised in the engine-core process, as text (type, message, traceback)."""
    error_type: str
    message: str
    traceback: str = ""
    is_sluice_error: bool = False   # a deliberate SluiceError: its message stands on its own

    @classmethod
    def from_exception(cls, exc: BaseException) -> "EngineFailure":
        from sluice.errors import SluiceError
        return cls(error_type=type(exc).__name__, message=str(exc),
                   traceback="".join(traceback.format_exception(exc)),
                   is_sluice_error=isinstance(exc, SluiceError))

    def describe(self) -> str:
        """The user-facing line: a SluiceError's own message, else "Type: message"."""
        if self.is_sluice_error and self.message:
            return self.message
        return f"{self.error_type}: {self.message}" if self.message else self.error_type


class HandshakeReady(msgspec.Struct, tag="ready"):
    ready: EngineReady


class HandshakeFailed(msgspec.Struct, tag="failed"):
    failure: EngineFailure


Handshake = HandshakeReady | HandshakeFailed

_REQUEST_TYPES: dict[RequestType, Any] = {
    RequestType.ADD: EngineCoreRequest, RequestType.ABORT: list[str],
    RequestType.UTILITY: UtilityRequest,
}
_OUTPUT_TYPES: dict[OutputType, Any] = {
    OutputType.OUTPUTS: EngineCoreOutputs, OutputType.UTILITY_RESULT: UtilityResult,
    OutputType.ENGINE_DEAD: EngineFailure,
}


class _Codec:
    """Encodes `(tag, obj)` to two frames and back; one instance per thread."""

    def __init__(self, enum_type: type[enum.IntEnum], types: dict[Any, Any]):
        self._enum = enum_type
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {tag: msgspec.msgpack.Decoder(t) for tag, t in types.items()}

    def encode(self, tag: enum.IntEnum, obj: Any = None) -> list[bytes]:
        body = b"" if obj is None else self._encoder.encode(obj)
        return [bytes((int(tag),)), body]

    def decode(self, frames: Sequence[bytes | memoryview]) -> tuple[Any, Any]:
        """Return `(tag, obj)`; raises ValueError / msgspec.DecodeError on a malformed message."""
        if len(frames) != 2 or len(frames[0]) != 1:
            raise ValueError(f"malformed message: {len(frames)} frames")
        tag = self._enum(bytes(frames[0])[0])
        decoder = self._decoders.get(tag)
        return tag, (None if decoder is None else decoder.decode(frames[1]))


def request_codec() -> _Codec:
    """Codec of frontend → engine messages (`RequestType` tags)."""
    return _Codec(RequestType, _REQUEST_TYPES)


def output_codec() -> _Codec:
    """Codec of engine → frontend messages (`OutputType` tags)."""
    return _Codec(OutputType, _OUTPUT_TYPES)


def encode_handshake(message: HandshakeReady | HandshakeFailed) -> bytes:
    return msgspec.msgpack.encode(message)


def decode_handshake(data: bytes) -> HandshakeReady | HandshakeFailed:
    return msgspec.msgpack.decode(data, type=Handshake)

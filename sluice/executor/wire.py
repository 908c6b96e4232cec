"""The executor ⇄ worker-process wire protocol (`mp` executor): message tags and msgspec codecs.
No torch, no pickle.

Every call is two ZeroMQ frames, `[header, body]`, from the executor to one rank's PULL socket
(the same encoded bytes go to every rank):

    header = struct "<BQ": (WorkerMethod tag, call_id)       body = msgspec-msgpack, or b""

and every answer is two frames from a rank's PUSH socket to the executor's one PULL socket:

    header = struct "<BHQ": (ReplyType tag, rank, call_id)   body = msgspec-msgpack

    VALUE    int                (setup calls: bytes of KV memory, bytes per block, pid, 0)
    OUTPUT   ModelRunnerOutput  (SAMPLE_TOKENS / STEP, from the output rank only: the last
                                stage's driver)
    FAILED   EngineFailure      (any rank, any call: the exception as text)

Each method's argument and answer are listed in `WorkerMethod`. `call_id` increases by one
per call, so an answer always names the call it belongs to.

A step is either two messages, EXECUTE_MODEL (the forward; nobody answers) then SAMPLE_TOKENS
(the grammar bitmask the engine core computed meanwhile; the output rank answers), or one
STEP message carrying both when the bitmask is known before the forward starts: a step where
no request has a grammar (bitmask None), or a pipeline-parallel step (the batch queue computes
it before submitting). Either way a step costs one round trip.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import msgspec

from sluice.engine.serial import EngineFailure
from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.structured_output.output import GrammarOutput

_CALL = struct.Struct("<BQ")
_REPLY = struct.Struct("<BHQ")


class WorkerMethod(enum.IntEnum):
    """The worker's methods (argument → answer of every rank, unless noted)."""
    HELLO = 0                   # nothing → pid (proves both sockets are connected)
    INIT = 1                    # nothing → 0: join the process group, build the Worker
    LOAD_MODEL = 2              # nothing → 0
    DETERMINE_KV_MEMORY = 3     # nothing → bytes available for the KV cache on this rank
    KV_BYTES_PER_BLOCK = 4      # nothing → bytes of one KV block on this rank
    INITIALIZE_KV_CACHE = 5     # int num_blocks → 0
    WARM_UP = 6                 # nothing → 0
    EXECUTE_MODEL = 7           # SchedulerOutput → no answer (the forward; SAMPLE_TOKENS next)
    SLEEP = 8                   # int level → 0
    WAKE_UP = 9                 # nothing → 0
    SHUTDOWN = 10               # nothing → no answer; the process exits
    SAMPLE_TOKENS = 11          # SampleCall → ModelRunnerOutput from the output rank only
    STEP = 12                   # StepCall → ModelRunnerOutput from the output rank only


STEP_METHODS = frozenset({WorkerMethod.EXECUTE_MODEL, WorkerMethod.SAMPLE_TOKENS,
                          WorkerMethod.STEP})
"""The calls that make up a step (bounded by the step timeout, not the setup one)."""


@dataclass
class SampleCall:
    """SAMPLE_TOKENS' argument: the step's bitmask, None when no sampling row has one."""
    grammar_output: GrammarOutput | None = None


@dataclass
class StepCall:
    """STEP's argument: a whole step (forward and sampling) in one message."""
    scheduler_output: SchedulerOutput
    grammar_output: GrammarOutput | None = None


class ReplyType(enum.IntEnum):
    VALUE = 0
    OUTPUT = 1
    FAILED = 2


_ARG_TYPES: dict[WorkerMethod, Any] = {
    WorkerMethod.INITIALIZE_KV_CACHE: int, WorkerMethod.EXECUTE_MODEL: SchedulerOutput,
    WorkerMethod.SLEEP: int, WorkerMethod.SAMPLE_TOKENS: SampleCall, WorkerMethod.STEP: StepCall,
}
_REPLY_TYPES: dict[ReplyType, Any] = {
    ReplyType.VALUE: int, ReplyType.OUTPUT: ModelRunnerOutput, ReplyType.FAILED: EngineFailure,
}


class CallCodec:
    """Executor → worker calls; one instance per thread."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {m: msgspec.msgpack.Decoder(t) for m, t in _ARG_TYPES.items()}

    def encode(self, method: WorkerMethod, call_id: int, arg: Any = None) -> list[bytes]:
        body = b"" if arg is None else self._encoder.encode(arg)
        return [_CALL.pack(int(method), call_id), body]

    def decode(self, frames: Sequence[bytes | memoryview]) -> tuple[WorkerMethod, int, Any]:
        """`(method, call_id, arg)`; raises ValueError / msgspec.DecodeError when malformed."""
        if len(frames) != 2 or len(frames[0]) != _CALL.size:
            raise ValueError(f"malformed worker call: {len(frames)} frames")
        tag, call_id = _CALL.unpack(frames[0])
        method = WorkerMethod(tag)
        decoder = self._decoders.get(method)
        return method, call_id, (None if decoder is None else decoder.decode(frames[1]))


class ReplyCodec:
    """Worker → executor answers; one instance per thread."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {t: msgspec.msgpack.Decoder(v) for t, v in _REPLY_TYPES.items()}

    def encode(self, kind: ReplyType, rank: int, call_id: int, value: Any) -> list[bytes]:
        return [_REPLY.pack(int(kind), rank, call_id), self._encoder.encode(value)]

    def decode(self, frames: Sequence[bytes | memoryview]) -> tuple[ReplyType, int, int, Any]:
        """`(kind, rank, call_id, value)`; raises ValueError / msgspec.DecodeError."""
        if len(frames) != 2 or len(frames[0]) != _REPLY.size:
            raise ValueError(f"malformed worker reply: {len(frames)} frames")
        tag, rank, call_id = _REPLY.unpack(frames[0])
        kind = ReplyType(tag)
        return kind, rank, call_id, self._decoders[kind].decode(frames[1])

"""The `mp` executor's wire protocol (no processes, no torch): every call and answer survives
msgspec encoding unchanged, malformed frames are refused, and the executor side of the
executor package imports no torch."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from sluice.engine.serial import EngineFailure
from sluice.executor.wire import CallCodec, ReplyCodec, ReplyType, WorkerMethod
from sluice.messages import TokenLogprobs
from sluice.sampling_params import SamplingParams
from sluice.step import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput


def scheduler_output() -> SchedulerOutput:
    params = SamplingParams(temperature=0.5, top_k=7, seed=3, max_tokens=9, stop=["x"],
                            logprobs=2, allowed_token_ids=[1, 2, 3])
    new = NewRequestData("a", [1, 2, 3, 4], 4, params, [5, 6], 0, eos_token_id=2)
    cached = CachedRequestData("b", [9], 130)
    return SchedulerOutput([new], [cached], {"a": 4, "b": 1}, 5, {"c", "d"})


def test_calls_round_trip():
    codec = CallCodec()
    step = scheduler_output()
    method, call_id, arg = codec.decode(codec.encode(WorkerMethod.EXECUTE_MODEL, 7, step))
    assert (method, call_id, arg) == (WorkerMethod.EXECUTE_MODEL, 7, step)
    assert isinstance(arg.scheduled_new_reqs[0].sampling_params, SamplingParams)
    assert arg.finished_request_ids == {"c", "d"}
    assert codec.decode(codec.encode(WorkerMethod.INITIALIZE_KV_CACHE, 8, 123)) == \
        (WorkerMethod.INITIALIZE_KV_CACHE, 8, 123)
    frames = codec.encode(WorkerMethod.WARM_UP, 2**40)
    assert frames[1] == b"" and codec.decode(frames) == (WorkerMethod.WARM_UP, 2**40, None)


def test_replies_round_trip():
    codec = ReplyCodec()
    out = ModelRunnerOutput({"a": [5], "b": []},
                            logprobs={"a": [TokenLogprobs([5, 1], [-0.1, -2.0], [1, 2])]})
    assert codec.decode(codec.encode(ReplyType.OUTPUT, 0, 3, out)) == \
        (ReplyType.OUTPUT, 0, 3, out)
    assert codec.decode(codec.encode(ReplyType.VALUE, 1, 4, 2**40)) == \
        (ReplyType.VALUE, 1, 4, 2**40)
    try:
        raise ValueError("boom")
    except ValueError as e:
        failure = EngineFailure.from_exception(e)
    kind, rank, call_id, value = codec.decode(codec.encode(ReplyType.FAILED, 3, 5, failure))
    assert (kind, rank, call_id) == (ReplyType.FAILED, 3, 5)
    assert value.describe() == "ValueError: boom" and "Traceback" in value.traceback


def test_malformed_frames_are_refused():
    with pytest.raises(ValueError):
        CallCodec().decode([b"\x00"])
    with pytest.raises(ValueError):
        ReplyCodec().decode([b"\x00\x00", b""])
    for method, arg in ((WorkerMethod.EXECUTE_MODEL, [1, 2]), (WorkerMethod.SLEEP, "deep")):
        with pytest.raises(msgspec.ValidationError):
            CallCodec().decode(CallCodec().encode(method, 1, arg))


def test_executor_side_imports_no_torch():
    code = ("import sys, sluice.executor.multiproc, sluice.executor.factory; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

"""OutputProcessor: output kinds, stop strings, n > 1 aggregation, logprobs, aborts, stats."""

from __future__ import annotations

import pytest

from sluice.errors import InvalidRequestError
from sluice.frontend.input_processor import InputProcessor
from sluice.frontend.output_processor import OutputProcessor
from sluice.frontend.tokenizer import load_tokenizer
from sluice.messages import EngineCoreOutput, FinishReason, TokenLogprobs
from sluice.outputs import Logprob
from sluice.sampling_params import RequestOutputKind as Kind
from sluice.sampling_params import SamplingParams

CUM, DELTA, FINAL = Kind.CUMULATIVE, Kind.DELTA, Kind.FINAL_ONLY


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture
def inp(tok):
    return InputProcessor(tok, max_model_len=256, vocab_size=2048, max_logprobs=5,
                          eos_token_id=0)


def _add(op, inp, rid="r", prompt="Hello", **params):
    params.setdefault("max_tokens", 100)
    req = inp.process(rid, prompt, SamplingParams(**params), arrival_time=100.0)
    return op.add_request(req, prompt if isinstance(prompt, str) else None)


def _run(op, rid, ids, finish=None, stop_reason=None, t0=101.0):
    """Feed `ids` one per step; the last step carries `finish`. Returns per-step results."""
    results = []
    for j, t in enumerate(ids):
        last = j == len(ids) - 1
        out = EngineCoreOutput(rid, [t], finish_reason=finish if last else None,
                               stop_reason=stop_reason if last else None)
        results.append(op.process_outputs([out], now=t0 + j))
    return results


def _outputs(results):
    return [o for r in results for o in r.request_outputs]


def test_cumulative_single_request(tok, inp):
    op = OutputProcessor(tok)
    [req] = _add(op, inp)
    text = " world, é漢字🙂!"
    ids = tok.encode(text)
    outs = _outputs(_run(op, "r", ids, FinishReason.LENGTH))
    assert len(outs) == len(ids)
    final = outs[-1]
    assert final.finished and final.request_id == "r" and final.prompt == "Hello"
    assert final.prompt_token_ids == req.prompt_token_ids
    [c] = final.outputs
    assert c.text == text and c.token_ids == ids and c.finish_reason == "length"
    assert c.stop_reason is None and c.cumulative_logprob is None and c.logprobs is None
    for o in outs:
        assert text.startswith(o.outputs[0].text) and "\ufffd" not in o.outputs[0].text
    assert not op.has_unfinished_requests()


def test_eos_hidden_from_text_but_kept_in_tokens(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, skip_special_tokens=False)
    ids = tok.encode(" ok") + [0]
    [c] = _outputs(_run(op, "r", ids, FinishReason.STOP))[-1].outputs
    assert c.text == " ok" and c.token_ids == ids and c.finish_reason == "stop"
    assert c.stop_reason is None


def test_stop_token_text_included_on_request(tok, inp):
    stop_tok = tok.encode(" end")[0]
    for include, expected in ((False, " ok"), (True, " ok end")):
        op = OutputProcessor(tok)
        _add(op, inp, stop_token_ids=[stop_tok], include_stop_str_in_output=include)
        ids = tok.encode(" ok") + [stop_tok]
        [c] = _outputs(_run(op, "r", ids, FinishReason.STOP, stop_tok))[-1].outputs
        assert c.text == expected and c.stop_reason == stop_tok


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_finishes_and_aborts(tok, inp, include):
    op = OutputProcessor(tok)
    _add(op, inp, stop=["STOP"], include_stop_str_in_output=include)
    ids = tok.encode(" value 42 STOP and more tokens")
    results = _run(op, "r", ids)
    aborts = [rid for r in results for rid in r.request_ids_to_abort]
    assert aborts == ["r"]
    outs = _outputs(results)
    final = outs[-1]
    assert final.finished
    [c] = final.outputs
    assert c.finish_reason == "stop" and c.stop_reason == "STOP"
    assert c.text == (" value 42 STOP" if include else " value 42 ")
    # Tokens after the stop string are dropped; later engine outputs are ignored.
    assert tok.decode(c.token_ids).startswith(" value 42 ST")
    assert len(c.token_ids) < len(ids)
    assert sum(len(r.request_outputs) for r in results[len(outs):]) == 0
    assert not op.has_unfinished_requests()


def test_stop_string_in_engine_finished_output_is_not_aborted(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, stop=["STOP"])
    ids = tok.encode(" x STOP")
    results = _run(op, "r", ids, FinishReason.LENGTH)
    assert not any(r.request_ids_to_abort for r in results)
    [c] = _outputs(results)[-1].outputs
    assert c.finish_reason == "stop" and c.stop_reason == "STOP" and c.text == " x "


def test_delta_stream_never_leaks_stop_string(tok, inp):
    text = " alpha beta 漢字🙂 gam gamma delta"
    for stop in (["gamma"], ["🙂 g"], ["beta 漢", "zzz"], ["a b"]):
        op = OutputProcessor(tok)
        _add(op, inp, stop=stop, output_kind=DELTA)
        outs = _outputs(_run(op, "r", tok.encode(text), FinishReason.LENGTH))
        streamed = ""
        for o in outs:
            streamed += o.outputs[0].text
            assert not any(s in streamed for s in stop)
        cut = min(text.find(s) for s in stop if s in text)
        assert streamed == text[:cut]
        assert outs[-1].finished and outs[-1].outputs[0].stop_reason in stop


def test_delta_tokens_and_text_concatenate(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, output_kind=DELTA, stop=["never"])
    text = " ever nev end é"
    ids = tok.encode(text)
    outs = _outputs(_run(op, "r", ids, FinishReason.LENGTH))
    assert len(outs) == len(ids)
    assert "".join(o.outputs[0].text for o in outs) == text
    assert [t for o in outs for t in o.outputs[0].token_ids] == ids
    assert [o.finished for o in outs] == [False] * (len(ids) - 1) + [True]


def test_final_only_delivers_once(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, output_kind=FINAL)
    ids = tok.encode(" just once")
    outs = _outputs(_run(op, "r", ids, FinishReason.LENGTH))
    assert len(outs) == 1 and outs[0].finished
    assert outs[0].outputs[0].text == " just once" and outs[0].outputs[0].token_ids == ids


def _feed_children(op, steps):
    """steps: list of lists of (engine_id, token, finish) per step."""
    return [op.process_outputs([EngineCoreOutput(rid, [t], finish_reason=f)
                                for rid, t, f in step], now=200.0 + i)
            for i, step in enumerate(steps)]


def test_n_samples_cumulative(tok, inp):
    op = OutputProcessor(tok)
    children = _add(op, inp, n=2, seed=3)
    assert [c.request_id for c in children] == ["0_r", "1_r"]
    a, b = tok.encode(" a")[0], tok.encode(" b")[0]
    L = FinishReason.LENGTH
    results = _feed_children(op, [[("0_r", a, None), ("1_r", b, None)],
                                  [("1_r", b, L)], [("0_r", a, L)]])
    outs = _outputs(results)
    assert len(outs) == 3 and all(o.request_id == "r" for o in outs)
    assert [len(o.outputs) for o in outs] == [2, 2, 2]
    assert [o.finished for o in outs] == [False, False, True]
    final = outs[-1]
    assert [c.index for c in final.outputs] == [0, 1]
    assert [c.text for c in final.outputs] == [" a a", " b b"]
    assert op.engine_request_ids("r") == [] and not op.has_unfinished_requests()


def test_n_samples_delta_only_touched(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, n=3, output_kind=DELTA)
    x = tok.encode(" x")[0]
    L = FinishReason.LENGTH
    outs = _outputs(_feed_children(op, [[("2_r", x, None), ("0_r", x, None)],
                                        [("1_r", x, L), ("0_r", x, L)], [("2_r", x, L)]]))
    assert [[c.index for c in o.outputs] for o in outs] == [[0, 2], [0, 1], [2]]
    assert [o.finished for o in outs] == [False, False, True]
    assert all(c.text == " x" for o in outs for c in o.outputs)


def test_n_samples_final_only_and_child_stop_string(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, n=2, output_kind=FINAL, stop=[" b"])
    a, b = tok.encode(" a")[0], tok.encode(" b")[0]
    results = _feed_children(op, [[("0_r", a, None), ("1_r", b, None)],
                                  [("0_r", a, FinishReason.LENGTH), ("1_r", a, None)]])
    assert results[0].request_ids_to_abort == ["1_r"]
    assert results[0].request_outputs == []
    [final] = results[1].request_outputs
    assert final.finished and final.request_id == "r"
    assert [(c.text, c.finish_reason, c.stop_reason) for c in final.outputs] == \
        [(" a a", "length", None), ("", "stop", " b")]


def test_logprobs_conversion(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, logprobs=2, prompt_logprobs=1, output_kind=DELTA)
    t1, t2, alt = tok.encode(" the")[0], tok.encode(" is")[0], 7
    assert tok.decode([t1]) == " the" and tok.decode([t2]) == " is"
    lp1 = TokenLogprobs([t1, t1, alt], [-0.5, -0.5, -1.5], [1, 1, 2])
    lp2 = TokenLogprobs([t2, alt, t1], [-2.0, -0.1, -1.0], [3, 1, 2])
    prompt_ids = tok.encode("Hello")
    plp = [TokenLogprobs([prompt_ids[i + 1], alt], [-1.0, -0.2], [2, 1])
           for i in range(len(prompt_ids) - 1)]
    r1 = op.process_outputs([EngineCoreOutput("r", [t1], new_logprobs=[lp1],
                                              prompt_logprobs=plp)], now=1.0)
    r2 = op.process_outputs([EngineCoreOutput("r", [t2], new_logprobs=[lp2],
                                              finish_reason=FinishReason.LENGTH)], now=2.0)
    o1, o2 = r1.request_outputs[0], r2.request_outputs[0]
    assert o1.prompt_logprobs[0] is None and len(o1.prompt_logprobs) == len(prompt_ids)
    assert o1.prompt_logprobs[1] == {
        prompt_ids[1]: Logprob(-1.0, 2, tok.decode_token(prompt_ids[1])),
        alt: Logprob(-0.2, 1, tok.decode_token(alt))}
    assert o2.prompt_logprobs is None  # DELTA: sent once
    assert o1.outputs[0].logprobs == [{t1: Logprob(-0.5, 1, " the"),
                                       alt: Logprob(-1.5, 2, tok.decode_token(alt))}]
    [pos2] = o2.outputs[0].logprobs
    assert list(pos2) == [t2, alt, t1] and pos2[t2] == Logprob(-2.0, 3, " is")
    assert o1.outputs[0].cumulative_logprob == pytest.approx(-0.5)
    assert o2.outputs[0].cumulative_logprob == pytest.approx(-2.5)
    assert o2.outputs[0].text == " is" and o2.finished


def test_cumulative_logprobs_lists_grow(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, logprobs=0)
    t = tok.encode(" hi")[0]
    lp = TokenLogprobs([t], [-0.25], [1])
    op.process_outputs([EngineCoreOutput("r", [t], new_logprobs=[lp])])
    r = op.process_outputs([EngineCoreOutput("r", [t], new_logprobs=[lp])])
    c = r.request_outputs[0].outputs[0]
    assert len(c.logprobs) == 2 and c.cumulative_logprob == pytest.approx(-0.5)
    assert r.request_outputs[0].prompt_logprobs is None


def test_abort_requests(tok, inp):
    op = OutputProcessor(tok, log_stats=True)
    _add(op, inp, n=2)
    _add(op, inp, rid="s")
    op.process_outputs([EngineCoreOutput("0_r", [5], finish_reason=FinishReason.LENGTH)])
    assert op.abort_requests(["r", "unknown"]) == ["1_r"]
    assert "r" not in op and "s" in op and op.get_num_unfinished_requests() == 1
    assert op.process_outputs([EngineCoreOutput("1_r", [5])]).request_outputs == []
    assert op.abort_requests(["s"]) == ["s"]
    stats = op.take_stats()
    assert sorted((f.request_id, f.finish_reason) for f in stats.finished_requests) == \
        [("0_r", "length"), ("1_r", "abort"), ("s", "abort")]


def test_engine_abort_is_delivered(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp)
    r = op.process_outputs([EngineCoreOutput("r", [], finish_reason=FinishReason.ABORT)])
    [o] = r.request_outputs
    assert o.finished and o.outputs[0].finish_reason == "abort" and o.outputs[0].text == ""


def test_duplicate_request_id(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp)
    with pytest.raises(InvalidRequestError) as e:
        _add(op, inp)
    assert e.value.param == "request_id"


def test_metrics_and_stats(tok, inp):
    op = OutputProcessor(tok, log_stats=True)
    _add(op, inp)
    ids = tok.encode(" one two three")
    outs = _outputs(_run(op, "r", ids, FinishReason.LENGTH, t0=101.0))
    m = outs[-1].metrics
    assert m.arrival_time == 100.0 and m.first_token_time == 101.0
    assert m.last_token_time == m.finished_time == 100.0 + len(ids)
    stats = op.take_stats()
    assert stats.ttfts == [1.0] and stats.itls == [1.0] * (len(ids) - 1)
    assert stats.num_generation_tokens == len(ids)
    assert stats.num_prompt_tokens == len(tok.encode("Hello"))
    [f] = stats.finished_requests
    assert f.finish_reason == "length" and f.e2e_latency == len(ids) and f.ttft == 1.0
    assert f.num_generation_tokens == len(ids)
    assert op.take_stats().ttfts == []
    assert OutputProcessor(tok).take_stats().finished_requests == []


def test_detokenize_false_and_token_prompt(tok, inp):
    op = OutputProcessor(tok)
    _add(op, inp, prompt=[5, 6], detokenize=False)
    [o] = op.process_outputs([EngineCoreOutput("r", [7, 8], finish_reason=FinishReason.LENGTH)]
                             ).request_outputs
    assert o.prompt is None and o.outputs[0].text == "" and o.outputs[0].token_ids == [7, 8]

"""Incremental detokenization (multi-byte UTF-8) and stop strings with hold-back."""

from __future__ import annotations

import random

import pytest

from sluice.frontend.detokenizer import IncrementalDetokenizer, StopStringDetokenizer
from sluice.frontend.tokenizer import load_tokenizer
from sluice.sampling_params import SamplingParams

TEXT = "Café au lait: é漢字🙂 and naïve façade — ünïcödé ✓ end."


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _stream(tok, ids, prompt=None, skip=True):
    detok = IncrementalDetokenizer(tok, prompt, skip)
    deltas = [detok.add_token(t) for t in ids]
    return deltas, detok.flush()


def test_multibyte_text_streams_whole_characters(tok):
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.split())  # multi-byte characters span several tokens
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) == TEXT and tail == ""
    for delta in deltas:
        assert "\ufffd" not in delta
    assert "" in deltas  # some tokens only carried part of a character


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_match_full_decode(tok, skip):
    rng = random.Random(1234)
    specials = [0, 1, 2, 3]
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(4, len(tok))
               for _ in range(rng.randrange(1, 25))]
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 8))]
        deltas, tail = _stream(tok, ids, prompt, skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
        for delta in deltas:
            assert not delta.endswith("\ufffd")  # never a character cut in half


def test_prompt_context_and_special_tokens(tok):
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode("Sure<|im_end|>")
    deltas, tail = _stream(tok, ids, prompt, skip=True)
    assert "".join(deltas) + tail == "Sure"
    deltas, tail = _stream(tok, ids, prompt, skip=False)
    assert "".join(deltas) + tail == "Sure<|im_end|>"


def test_prompt_ending_mid_character(tok):
    ids = tok.encode("🙂🙂")
    # Split the emoji bytes between prompt and output: output decodes on its own.
    prompt, out = ids[:1], ids[1:]
    assert tok.decode(prompt).endswith("\ufffd")
    deltas, tail = _stream(tok, out, prompt)
    assert "".join(deltas) + tail == tok.decode(out)


def _run_stop(tok, text, **params):
    sp = SamplingParams(**params)
    detok = StopStringDetokenizer(tok, None, sp)
    shown = []
    matched = None
    for t in tok.encode(text):
        matched = detok.add_token(t)
        shown.append(detok.text)
        if matched is not None:
            break
    if matched is None:
        matched = detok.finish()
    shown.append(detok.text)
    return detok, matched, shown


def test_stop_string_trimmed(tok):
    detok, matched, _ = _run_stop(tok, "The answer is 42. STOP here and more", stop=["STOP"])
    assert matched == "STOP" and detok.stop_reason == "STOP" and detok.done
    assert detok.text == "The answer is 42. "


def test_stop_string_included(tok):
    detok, matched, _ = _run_stop(tok, "The answer is 42. STOP here", stop=["STOP"],
                                  include_stop_str_in_output=True)
    assert matched == "STOP" and detok.text == "The answer is 42. STOP"


def test_stop_string_spanning_tokens_and_multibyte(tok):
    text = "abc 漢字🙂 xyz"
    ids = tok.encode(text)
    stop = "字🙂"
    # The stop string is not one token.
    assert all(stop not in tok.decode([i]) for i in ids)
    detok, matched, shown = _run_stop(tok, text, stop=[stop])
    assert matched == stop and detok.text == "abc 漢"
    for partial in shown:
        assert detok.text.startswith(partial)  # nothing shown that was later cut


def test_earliest_stop_string_wins(tok):
    detok, matched, _ = _run_stop(tok, "one two three four", stop=["four", "two", "thr"])
    assert matched == "two" and detok.text == "one "


def test_hold_back_released_at_finish(tok):
    detok, matched, shown = _run_stop(tok, "value is STO", stop=["STOP"])
    assert matched is None
    assert shown[-2] == "value is "    # "STO" may still become "STOP": held back
    assert shown[-1] == "value is STO"  # released at finish


def test_no_hold_back_when_including_stop(tok):
    _, matched, shown = _run_stop(tok, "value is STO", stop=["STOP"],
                                  include_stop_str_in_output=True)
    assert matched is None and shown[-2] == "value is STO"


def test_min_tokens_defers_stop_strings(tok):
    text = "STOP now STOP later"
    n_first = len(tok.encode("STOP now"))
    detok, matched, _ = _run_stop(tok, text, stop=["STOP"], min_tokens=n_first,
                                  max_tokens=100)
    assert matched == "STOP" and detok.text == "STOP now "


def test_stream_never_leaks_stop_prefix_random(tok):
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "é", "漢字", "🙂", "stop", "sto", "st", "!", "\n"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(3, 15)))
        stops = [rng.choice(["stop", "a g", "🙂 s", "!\n", "ta g"])]
        detok, matched, shown = _run_stop(tok, text, stop=stops)
        final = detok.text
        for partial in shown:
            assert final.startswith(partial)
        expected_cut = min((text.find(s) for s in stops if s in text), default=-1)
        if expected_cut == -1:
            assert matched is None and final == text
        else:
            assert matched is not None and final == text[:expected_cut]


def _sentencepiece_style_tokenizer():
    """A Llama-style tokenizer: Metaspace, byte fallback, leading space stripped on decode."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sluice.frontend.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "▁w", "he", "ll", "llo", "or", "ld"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "w"), ("h", "e"), ("l", "l"), ("ll", "o"), ("o", "r"), ("l", "d")]
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                                    unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    rust.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>",
                                             eos_token="</s>", unk_token="<unk>"))


def test_sentencepiece_style_spaces_and_byte_fallback():
    tok = _sentencepiece_style_tokenizer()
    text = "hello world é漢字🙂 held"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    # With the prompt as context the first output token keeps its leading space.
    deltas, tail = _stream(tok, tok.encode(" world", add_special_tokens=False),
                           prompt=tok.encode("hello", add_special_tokens=False))
    assert "".join(deltas) + tail == " world"

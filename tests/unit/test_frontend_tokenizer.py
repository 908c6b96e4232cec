"""Frontend tokenizer wrapper: loading, encode/decode, chat templates, load errors."""

from __future__ import annotations

import json
import shutil

import pytest

from sluice.errors import InvalidRequestError, ModelLoadError
from sluice.frontend.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _copy_without_template(src, dst):
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return dst


def test_basic_properties(tok):
    assert tok.vocab_size == len(tok) == 2048
    assert tok.eos_token_id == 0 and tok.bos_token_id == 0
    assert {0, 1, 2, 3} <= tok.all_special_ids


def test_encode_decode_roundtrip(tok):
    text = "Hello world, é漢字🙂 done."
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_convert_ids_to_tokens_and_decode_token(tok):
    ids = tok.encode(" the")
    assert tok.convert_ids_to_tokens(ids)[0].startswith("Ġ")
    assert tok.decode_token(0) == "<|endoftext|>"
    assert "".join(tok.decode_token(i) for i in tok.encode("plain ascii")) == "plain ascii"


def test_apply_chat_template(tok):
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"


def test_no_chat_template_is_a_400(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(_copy_without_template(tiny_tokenizer_dir, tmp_path / "t"))
    with pytest.raises(InvalidRequestError, match="no chat template") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert e.value.param == "messages"
    # An explicit template still works.
    out = tok.apply_chat_template([{"role": "user", "content": "x"}],
                                  chat_template="{{ messages[0]['content'] }}!")
    assert out == "x!"


def test_template_error_is_a_400(tok):
    with pytest.raises(InvalidRequestError) as e:
        tok.apply_chat_template([{"role": "user", "content": "x"}],
                                chat_template="{{ raise_exception('roles must alternate') }}")
    assert e.value.param == "messages" and "roles must alternate" in str(e.value)


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="nope"):
        load_tokenizer(missing)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="No tokenizer files") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)

"""The offline `LLM` API as vLLM code calls it, on a real engine with a tiny model: prompt
forms, chat, the tokenizer, generation_config.json defaults, and the vLLM sampling extras
(allowed_token_ids, bad_words, truncate_prompt_tokens, best_of), each checked by its effect."""

from __future__ import annotations

import json
import shutil

import pytest

from sluice.frontend.input_processor import bad_words_token_ids
from sluice.sampling_params import SamplingParams

GENERATION_DEFAULTS = {"temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.05,
                       "repetition_penalty": 1.1, "max_new_tokens": 5}
GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPT = "The function returns"
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}{{ suffix | default('') }}")


@pytest.fixture(scope="module")
def model_dir(llama_dir, tmp_path_factory):
    """The tiny llama with generation_config.json sampling defaults."""
    path = tmp_path_factory.mktemp("llama_gen_cfg")
    for f in llama_dir.iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    gen = json.loads((llama_dir / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **GENERATION_DEFAULTS}))
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    from sluice.frontend.llm import LLM
    engine = LLM(str(model_dir), kv_cache_memory="32MiB", max_model_len=256, max_logprobs=5)
    yield engine
    engine.shutdown()


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _gen(llm, prompts, params=GREEDY):
    return llm.generate(prompts, params, use_tqdm=False)


# ---- prompt forms ------------------------------------------------------------------------

def test_every_prompt_form_gives_the_same_greedy_tokens(llm):
    ids = llm.get_tokenizer()(PROMPT)["input_ids"]
    expected = _tokens(_gen(llm, PROMPT))[0]
    assert _tokens(_gen(llm, [PROMPT])) == [expected]
    single_dict = _gen(llm, {"prompt": PROMPT})
    assert _tokens(single_dict) == [expected] and single_dict[0].prompt == PROMPT
    assert _tokens(_gen(llm, [{"prompt_token_ids": ids}])) == [expected]
    assert _tokens(_gen(llm, {"prompt_token_ids": ids})) == [expected]
    assert _tokens(_gen(llm, ids)) == [expected]
    mixed = _gen(llm, [PROMPT, {"prompt": PROMPT}, {"prompt_token_ids": ids}, ids, "x"])
    assert _tokens(mixed)[:4] == [expected] * 4
    assert [o.prompt_token_ids for o in mixed[:4]] == [ids] * 4
    with_salt = _gen(llm, {"prompt_token_ids": ids, "cache_salt": "s", "prompt": PROMPT})
    assert _tokens(with_salt) == [expected] and with_salt[0].prompt == PROMPT


@pytest.mark.parametrize("prompt,key", [
    ({"prompt": "x", "multi_modal_data": {"image": None}}, "multi_modal_data"),
    ([{"prompt_token_ids": [5, 6], "mm_processor_kwargs": {}}], "mm_processor_kwargs"),
])
def test_unknown_prompt_keys_are_refused_by_name(llm, prompt, key):
    with pytest.raises(ValueError, match=key):
        _gen(llm, prompt)
    assert not llm.output_processor.has_unfinished_requests()


def test_one_sampling_params_per_prompt(llm):
    outs = _gen(llm, [PROMPT, PROMPT], [SamplingParams(temperature=0, max_tokens=3),
                                        SamplingParams(temperature=0, max_tokens=6)])
    assert [len(t) for t in _tokens(outs)] == [3, 6]
    with pytest.raises(ValueError, match="one per prompt"):
        _gen(llm, [PROMPT, PROMPT], [GREEDY])


# ---- chat and tokenizer ------------------------------------------------------------------

def test_chat_one_or_many_conversations(llm):
    conv = [{"role": "user", "content": "Hello"}]
    other = [{"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    one = llm.chat(conv, GREEDY, use_tqdm=False)
    both = llm.chat([conv, other], GREEDY, use_tqdm=False)
    assert len(one) == 1 and len(both) == 2
    assert one[0].prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert both[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    assert "Bye" in both[1].prompt
    bare = llm.chat(conv, GREEDY, use_tqdm=False, add_generation_prompt=False)
    assert not bare[0].prompt.endswith("assistant\n")


def test_chat_template_kwargs_tools_and_continue_final_message(llm):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure"}]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    out = llm.chat(conv, GREEDY, use_tqdm=False, chat_template=TOOLS_TEMPLATE,
                   chat_template_kwargs={"suffix": "!"})[0]
    assert out.prompt == "<user>Hi</user>\n<assistant>Sure</assistant>\n<assistant>!"
    continued = llm.chat(conv, GREEDY, use_tqdm=False, chat_template=TOOLS_TEMPLATE,
                         tools=tools, add_generation_prompt=False,
                         continue_final_message=True)[0]
    assert continued.prompt == "TOOLS:get_weather;<user>Hi</user>\n<assistant>Sure"
    assert continued.prompt_token_ids == llm.tokenizer.encode(continued.prompt,
                                                              add_special_tokens=False)
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(conv, GREEDY, use_tqdm=False, continue_final_message=True)


def test_get_tokenizer_is_the_hugging_face_tokenizer(llm):
    tok = llm.get_tokenizer()
    ids = tok("hello world")["input_ids"]
    assert ids == llm.tokenizer.encode("hello world")
    assert tok.decode(ids) == "hello world"


# ---- generation_config.json defaults -----------------------------------------------------

def test_generation_config_defaults_apply_when_no_params_are_given(llm, model_dir):
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p,
            defaults.repetition_penalty, defaults.max_tokens) == (0.5, 0.9, 7, 0.05, 1.1, 5)
    outs = llm.generate([PROMPT, "x"], use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) <= 5 for o in outs)
    assert any(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 5
               for o in outs)


def test_generation_config_vllm_turns_the_defaults_off(model_dir):
    from sluice.frontend.llm import LLM
    with LLM(str(model_dir), kv_cache_memory="16MiB", max_model_len=128,
             generation_config="vllm") as plain:
        assert plain.get_default_sampling_params() == SamplingParams()
        out = plain.generate(PROMPT, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 16 or out.finish_reason == "stop"


# ---- sampling extras ---------------------------------------------------------------------

def test_allowed_token_ids_restrict_greedy_and_random_sampling(llm):
    free = set(_tokens(_gen(llm, PROMPT, SamplingParams(temperature=0, max_tokens=12)))[0])
    allowed = [t for t in range(100, 140) if t not in free][:5]
    for params in (SamplingParams(temperature=0, max_tokens=12, allowed_token_ids=allowed),
                   SamplingParams(temperature=1.0, seed=1, max_tokens=12,
                                  allowed_token_ids=allowed)):
        tokens = _tokens(_gen(llm, PROMPT, params))[0]
        assert len(tokens) == 12 and set(tokens) <= set(allowed), tokens


def test_bad_words_are_never_generated(llm):
    tok = llm.tokenizer
    prompts = [PROMPT, "A list is a mutable sequence type that", "The import system"]
    params = SamplingParams(temperature=0, max_tokens=16)
    free = _tokens(_gen(llm, prompts, params))
    word = None
    for tokens in free:  # a generated token that is a whole word the bad-words code bans
        for token_id in tokens:
            text = tok.decode([token_id]).strip()
            if text.isalpha() and [token_id] in bad_words_token_ids(tok, [text]):
                word = text
                break
        if word:
            break
    assert word is not None, "no generated token is a whole word; pick other prompts"
    banned = {seq[0] for seq in bad_words_token_ids(tok, [word]) if len(seq) == 1}
    assert any(banned & set(tokens) for tokens in free)
    constrained = _tokens(_gen(llm, prompts, params.with_updates(bad_words=[word])))
    assert all(not banned & set(tokens) for tokens in constrained), (word, constrained)
    assert constrained != free


def test_truncate_prompt_tokens_keeps_the_last_k(llm):
    ids = llm.tokenizer.encode("In Python, the with statement is used to wrap the execution")
    out = _gen(llm, ids, GREEDY.with_updates(truncate_prompt_tokens=4))[0]
    assert out.prompt_token_ids == ids[-4:]
    assert out.outputs[0].token_ids == _tokens(_gen(llm, ids[-4:]))[0]
    with pytest.raises(ValueError, match="max_model_len"):
        _gen(llm, ids, GREEDY.with_updates(truncate_prompt_tokens=10_000))


def test_best_of_returns_the_n_highest_cumulative_logprob(llm):
    sample = dict(temperature=1.0, seed=11, max_tokens=8)
    every = _gen(llm, PROMPT, SamplingParams(n=5, logprobs=0, **sample))[0].outputs
    best = _gen(llm, PROMPT, SamplingParams(n=2, best_of=5, **sample))[0].outputs
    ranked = sorted(every, key=lambda o: -o.cumulative_logprob)[:2]
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked]
    assert [o.index for o in best] == [0, 1]
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    assert best[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob)
    assert all(o.logprobs is None for o in best)  # not asked for
    assert len({tuple(o.token_ids) for o in every}) > 2  # the choice was a real one

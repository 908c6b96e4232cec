"""`sluice serve` accepts vLLM's flag names (issue 14, item 2): each is parsed into the config,
honoured (tested here where no engine is needed, the rest in tests/engine/test_engine_flags.py
and tests/entrypoints/test_serve_flags_e2e.py) or logged as having no effect; unknown flags get
`serve`'s usage and a did-you-mean among `serve`'s own flags. No torch, no engine."""

from __future__ import annotations

import json
import logging
import types

import pytest

from sluice.config_sources import build_engine_config, engine_config_from_args
from sluice.entrypoints import cli
from sluice.errors import ConfigError, ModelLoadError


def serve_config(*flags: str):
    parser, module = cli.build_parser("serve")
    return engine_config_from_args(parser.parse_args(["serve", *flags]))


# ---- parsing ----------------------------------------------------------------------------------

def test_vllm_flags_parse_into_the_config():
    cfg = serve_config("--gpu-memory-utilization", "0.8", "--enforce-eager", "--swap-space", "4",
                       "--trust-remote-code", "--dtype", "half", "--kv-cache-dtype", "bfloat16",
                       "--chat-template", "{{ messages }}", "--uvicorn-log-level", "warning",
                       "--root-path", "/api", "--ssl-keyfile", "k.pem", "--ssl-certfile",
                       "c.pem", "--disable-log-requests", "--max-log-len", "40")
    assert cfg.cache.gpu_memory_utilization == 0.8
    assert cfg.device.enforce_eager is True
    assert cfg.cache.swap_space == 4.0
    assert cfg.model.trust_remote_code is True
    assert cfg.model.dtype == "float16"
    assert cfg.cache.kv_cache_dtype == "bfloat16"
    assert cfg.model.chat_template == "{{ messages }}"
    assert cfg.server.uvicorn_log_level == "warning"
    assert cfg.server.root_path == "/api"
    assert (cfg.server.ssl_keyfile, cfg.server.ssl_certfile) == ("k.pem", "c.pem")
    assert cfg.observability.disable_log_requests is True
    assert cfg.observability.max_log_len == 40


@pytest.mark.parametrize("given,stored", [("half", "float16"), ("float16", "float16"),
                                          ("bfloat16", "bfloat16"), ("float", "float32"),
                                          ("float32", "float32"), ("auto", "auto"),
                                          ("HALF", "float16")])
def test_dtype_names_and_vllm_aliases(given, stored):
    assert serve_config("--dtype", given).model.dtype == stored
    assert build_engine_config(overrides={"dtype": given}, env={}).model.dtype == stored
    assert build_engine_config(env={"SLUICE_DTYPE": given}).model.dtype == stored


@pytest.mark.parametrize("given,stored", [("auto", "auto"), ("bfloat16", "bfloat16"),
                                          ("float16", "float16"), ("float32", "float32"),
                                          ("half", "float16"), ("fp8", "fp8_e4m3"),
                                          ("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"),
                                          ("FP8", "fp8_e4m3")])
def test_kv_cache_dtype_values(given, stored):
    assert serve_config("--kv-cache-dtype", given).cache.kv_cache_dtype == stored


def test_unsupported_kv_cache_dtype_is_refused_clearly():
    with pytest.raises(ConfigError) as e:
        serve_config("--kv-cache-dtype", "fp8_inc")   # vLLM's Gaudi-only fp8
    assert "--kv-cache-dtype: 'fp8_inc'" in str(e.value) and "fp8_e5m2" in str(e.value)


def test_request_log_switches():
    assert serve_config().observability.disable_log_requests is True  # quiet by default
    assert serve_config("--enable-log-requests").observability.disable_log_requests is False
    assert serve_config("--no-disable-log-requests").observability.disable_log_requests is False


@pytest.mark.parametrize("flags", [("--gpu-memory-utilization", "0"),
                                   ("--gpu-memory-utilization", "1.5"),
                                   ("--uvicorn-log-level", "loud"), ("--max-log-len", "-1"),
                                   ("--swap-space", "-2")])
def test_bad_values_are_config_errors(flags):
    with pytest.raises(ConfigError) as e:
        serve_config(*flags)
    assert flags[0] in str(e.value)


# ---- unknown flags ------------------------------------------------------------------------------

def test_unknown_flag_prints_serve_usage_and_a_serve_flag(capsys):
    assert cli.main(["serve", "--revison", "main"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sluice serve ")
    assert "did you mean --revision?" in err  # not --version (a top-level flag)


def test_unknown_flag_far_from_everything_gets_no_suggestion(capsys):
    assert cli.main(["serve", "--qwertyuiop"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: sluice serve ") and "unrecognized arguments: --qwertyuiop" in err
    assert "did you mean" not in err


def test_british_spelling_suggests_the_vllm_flag(capsys):
    assert cli.main(["serve", "--gpu-memory-utilisation", "0.5"]) == 2
    assert "did you mean --gpu-memory-utilization?" in capsys.readouterr().err


def test_suggestions_use_edit_distance():
    assert cli.edit_distance("revison", "revision") == 1
    assert cli.edit_distance("kitten", "sitting") == 3
    assert cli.closest_flag("--revison", ["--version", "--revision"]) == "--revision"
    assert cli.closest_flag("--max-num-seq=3", ["--max-num-seqs", "--seed"]) == "--max-num-seqs"
    assert cli.closest_flag("--xyz", ["--seed", "--port"]) is None


# ---- chat template ------------------------------------------------------------------------------

def test_chat_template_from_file_inline_or_refused(tmp_path):
    from sluice.frontend.tokenizer import resolve_chat_template
    f = tmp_path / "t.jinja"
    f.write_text("FILE {{ messages[0]['content'] }}")
    assert resolve_chat_template(str(f)) == "FILE {{ messages[0]['content'] }}"
    assert resolve_chat_template("INLINE {{ 1 }}") == "INLINE {{ 1 }}"
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        resolve_chat_template("{% for m in messages %}")


def test_serve_refuses_a_bad_chat_template_before_loading(capsys, tmp_path):
    assert cli.main(["serve", str(tmp_path), "--chat-template", "no/such/file.jinja",
                     "--port", "0"]) == 2
    assert "--chat-template" in capsys.readouterr().err


def test_chat_template_replaces_the_tokenizer_template(tiny_tokenizer_dir):
    from sluice.frontend.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_tokenizer_dir, chat_template="CUSTOM[{{ messages[0]['content'] }}]")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "CUSTOM[hi]"


# ---- TLS files ----------------------------------------------------------------------------------

def test_tls_flags_are_checked_at_startup(tmp_path):
    from sluice.entrypoints.serve_cmd import check_tls_files
    server = types.SimpleNamespace
    check_tls_files(server(ssl_keyfile=None, ssl_certfile=None))
    with pytest.raises(ConfigError, match="--ssl-keyfile: given without --ssl-certfile"):
        check_tls_files(server(ssl_keyfile="k.pem", ssl_certfile=None))
    with pytest.raises(ConfigError, match="does not exist"):
        check_tls_files(server(ssl_keyfile=None, ssl_certfile=str(tmp_path / "none.pem")))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a usable certificate"):
        check_tls_files(server(ssl_keyfile=str(bad), ssl_certfile=str(bad)))


def test_root_path_is_stripped_for_route_checks():
    from sluice.entrypoints.openai.app import route_path
    assert route_path({"path": "/api/health", "root_path": "/api"}) == "/health"
    assert route_path({"path": "/health", "root_path": ""}) == "/health"
    assert route_path({"path": "/health"}) == "/health"


# ---- no-effect flags: one log line each ---------------------------------------------------------

def test_no_effect_flags_say_why_on_cpu():
    from sluice.platform.cpu import CpuPlatform
    cfg = build_engine_config(overrides={"enforce_eager": True, "swap_space": 4,
                                         "trust_remote_code": True}, env={})
    notes = CpuPlatform().ineffective_options(cfg)
    assert len(notes) == 3 and all("\n" not in n for n in notes)
    assert any(n.startswith("--enforce-eager has no effect on cpu") for n in notes)
    assert any(n.startswith("--swap-space 4 has no effect on cpu") for n in notes)
    assert any(n.startswith("--trust-remote-code has no effect") for n in notes)
    assert CpuPlatform().ineffective_options(build_engine_config(env={})) == []


# ---- remote code --------------------------------------------------------------------------------

def _model_dir(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


def test_model_needing_remote_code_is_refused(tmp_path):
    from sluice.hf_config import load_model_spec
    d = _model_dir(tmp_path, architectures=["MagicForCausalLM"],
                   auto_map={"AutoModelForCausalLM": "modeling_magic.MagicForCausalLM"})
    with pytest.raises(ModelLoadError) as e:
        load_model_spec(d)
    message = str(e.value)
    assert "auto_map" in message and "never runs remote code" in message
    assert "--trust-remote-code" in message and "LlamaForCausalLM" in message


def test_unknown_architecture_mentions_remote_code(tmp_path):
    from sluice.hf_config import load_model_spec
    with pytest.raises(ModelLoadError, match="with or without --trust-remote-code"):
        load_model_spec(_model_dir(tmp_path, architectures=["MagicForCausalLM"]))


# ---- request log --------------------------------------------------------------------------------

def test_request_log_line_is_cut_to_max_log_len(caplog):
    from sluice.frontend.async_llm import AsyncLLM
    from sluice.sampling_params import SamplingParams

    def log(max_log_len):
        fake = types.SimpleNamespace(config=types.SimpleNamespace(
            observability=types.SimpleNamespace(max_log_len=max_log_len)))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sluice.frontend.async_llm"):
            AsyncLLM._log_request(fake, "req-1", "abcdefghijklmnop", list(range(30)),
                                  SamplingParams(max_tokens=5))
        return caplog.records[-1].getMessage()

    short = log(4)
    assert short.startswith("Received request req-1: prompt: 'abcd', params: ")
    assert "max_tokens=5" in short and "prompt_token_ids: [0, 1, 2, 3] ... (30 in all)" in short
    full = log(None)
    assert "'abcdefghijklmnop'" in full and "29]" in full and "in all" not in full


# ---- sluice chat --------------------------------------------------------------------------------

class _FakeCompletions:
    def __init__(self):
        self.calls = []

    def create(self, model, messages, stream, max_tokens):
        self.calls.append((model, [dict(m) for m in messages], max_tokens))
        reply = f"reply{len(self.calls)}"
        delta = types.SimpleNamespace(content=reply)
        yield types.SimpleNamespace(choices=[types.SimpleNamespace(delta=delta)])


def test_chat_keeps_the_conversation(capsys):
    import io
    from sluice.entrypoints.chat_cmd import chat
    completions = _FakeCompletions()
    client = types.SimpleNamespace(chat=types.SimpleNamespace(completions=completions))
    out = io.StringIO()
    chat(client, "m", "be brief", None, 7, io.StringIO("hello\n\nagain\n"), out)
    assert out.getvalue() == "reply1\nreply2\n"
    assert [c[1] for c in completions.calls] == [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
         {"role": "assistant", "content": "reply1"}, {"role": "user", "content": "again"}]]
    assert completions.calls[0][0] == "m" and completions.calls[0][2] == 7


def test_chat_unreachable_server_is_one_line(capsys):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["chat", "--url", f"http://127.0.0.1:{port}/v1", "--model-name", "m",
                     "--quick", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the server at http://127.0.0.1:{port}/v1")
    assert err.count("\n") == 1

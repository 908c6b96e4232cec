"""The `sluice` command: lazy subcommands, error reporting and exit codes, `generate` against a
fake `LLM`. In-process except for the import checks, which need a fresh interpreter."""

from __future__ import annotations

import io
import subprocess
import sys
import types

import pytest

from sluice.entrypoints import cli
from sluice.errors import ModelLoadError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("SLUICE_CONFIG", "SLUICE_MAX_NUM_SEQS", "SLUICE_SEED", "SLUICE_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_cli_import_and_help_do_not_import_torch():
    code = """
import sys, contextlib, io
import sluice.entrypoints.cli as cli
assert "torch" not in sys.modules, "import"
with contextlib.redirect_stdout(io.StringIO()):
    assert cli.main(["--help"]) == 0
    assert cli.main(["generate", "--help"]) == 0
    assert cli.main(["env", "--help"]) == 0
    cli.build_parser("env")
assert "torch" not in sys.modules, "help"
print("ok")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_config_modules_do_not_import_torch():
    result = run_python("import sys, sluice.config_sources, sluice.platform, "
                        "sluice.entrypoints.env_report, sluice.entrypoints.generate_cmd; "
                        "assert 'torch' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("serve", "generate", "chat", "bench", "env"):
        assert name in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert "sluice" in capsys.readouterr().out


def test_misspelt_flag_suggests(capsys):
    assert cli.main(["generate", "--max-num-seq", "3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean --max-num-seqs?" in err


def test_no_prefix_abbreviations(capsys):
    assert cli.main(["generate", "--max-num", "3", "--prompt", "x"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_missing_subcommand_module(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("sluice.entrypoints.no_such_cmd", "x"))
    assert cli.main(["ghost"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: `sluice ghost` is not available") and "Traceback" not in err


def fake_command(monkeypatch, exc: Exception) -> None:
    module = types.ModuleType("sluice_fake_cmd")

    def add_parser(subparsers):
        return subparsers.add_parser("fake", help="fake")

    def run(args):
        raise exc

    module.add_parser, module.run = add_parser, run
    monkeypatch.setitem(sys.modules, "sluice_fake_cmd", module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("sluice_fake_cmd", "fake"))


def test_sluice_error_exits_1_with_one_line(monkeypatch, capsys):
    fake_command(monkeypatch, ModelLoadError("/m/config.json is missing"))
    assert cli.main(["fake"]) == 1
    assert capsys.readouterr().err == "error: /m/config.json is missing\n"


def test_config_error_exits_2_listing_problems(capsys):
    rc = cli.main(["generate", "--max-num-seqs", "0", "--block-size", "7", "--prompt", "x"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 configuration problems:")
    assert "--max-num-seqs: '0'" in err and "--block-size: '7'" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# generate, against a fake sluice.frontend.llm

class FakeLLM:
    instances: list["FakeLLM"] = []

    def __init__(self, config):
        self.config = config
        self.calls: list = []
        self.shut = False
        FakeLLM.instances.append(self)

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"<{p}>")])
                for p in prompts]

    def shutdown(self):
        self.shut = True


@pytest.fixture
def fake_llm(monkeypatch):
    module = types.ModuleType("sluice.frontend.llm")
    module.LLM = FakeLLM
    monkeypatch.setitem(sys.modules, "sluice.frontend.llm", module)
    FakeLLM.instances = []
    return FakeLLM


def test_generate(fake_llm, capsys):
    rc = cli.main(["generate", "/models/tiny", "--prompt", "Hello", "--max-num-seqs", "4",
                   "--max-tokens", "5", "--temperature", "0", "--top-p", "0.9", "--top-k", "3",
                   "--ignore-eos", "--no-enable-prefix-caching", "--seed", "7"])
    assert rc == 0
    assert capsys.readouterr().out == "<Hello>\n"
    llm = fake_llm.instances[0]
    cfg = llm.config
    assert cfg.model.model == "/models/tiny" and cfg.scheduler.max_num_seqs == 4
    assert cfg.cache.enable_prefix_caching is False and cfg.model.seed == 7
    prompts, params = llm.calls[0]
    assert prompts == ["Hello"]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (5, 0.0, 0.9, 3)
    assert params.ignore_eos is True and params.seed == 7
    assert llm.shut


def test_generate_several_prompts_and_defaults(fake_llm, capsys):
    assert cli.main(["generate", "-p", "a", "-p", "b"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] a\n<a>\n" in out and "[2/2] b\n<b>\n" in out
    _, params = fake_llm.instances[0].calls[0]
    assert params.seed is None and params.ignore_eos is False


def test_generate_reads_stdin(fake_llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    assert cli.main(["generate"]) == 0
    assert capsys.readouterr().out == "<from stdin>\n"


def test_generate_without_prompt(fake_llm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["generate"]) == 2
    assert "--prompt: no prompt was given" in capsys.readouterr().err
    assert not fake_llm.instances


def test_generate_bad_sampling_flag(fake_llm, capsys):
    assert cli.main(["generate", "--prompt", "x", "--top-p", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --top-p:") and "(0, 1]" in err
    assert not fake_llm.instances


def test_generate_has_no_server_flags(capsys):
    assert cli.main(["generate", "--port", "1", "--prompt", "x"]) == 2
    assert "unrecognized arguments: --port" in capsys.readouterr().err

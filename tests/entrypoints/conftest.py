"""Live `sluice serve` processes on 127.0.0.1 for the entrypoint tests.

`start_server(model_dir, *flags)` launches `sluice serve` in a subprocess on a free port and
waits (with a deadline) until /health answers 200; `stop()` ends it and its engine core.
The session fixture `server` is the shared one most tests use (API key `API_KEY`);
`limited_server` (max 1 running, 1 queued, a model without chat template, request templates
trusted, 4 M-character prompts) serves the 429, no-template and event-loop tests. Keep the
number of servers small: each start costs seconds on 2 cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from _sluice_server_helpers import API_KEY, COMMON_FLAGS, ServerProcess


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Call with (model_dir, *flags) -> a ready ServerProcess (stopped at session end)."""
    started: list[ServerProcess] = []

    def start(model_dir: Path, *flags: str, wait: bool = True) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "serve.log"
        server = ServerProcess(model_dir, (*COMMON_FLAGS, *flags), log_path)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, llama_dir) -> ServerProcess:
    """The shared server: the tiny llama, `--api-key API_KEY`, CORS for one origin."""
    return start_server(llama_dir, "--api-key", API_KEY, "--served-model-name", "tiny-llama",
                        "--allowed-origins", "http://allowed.example")


@pytest.fixture(scope="session")
def no_template_dir(llama_dir, tmp_path_factory) -> Path:
    """A copy of the tiny llama whose tokenizer has no chat template."""
    path = tmp_path_factory.mktemp("llama-no-template")
    for f in llama_dir.iterdir():
        if f.is_file() and f.name != "chat_template.jinja":
            shutil.copy(f, path / f.name)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def limited_server(start_server, no_template_dir) -> ServerProcess:
    """One request runs at a time, one may wait; no chat template; no API key. A longer
    context than the other servers, so that one request can run long enough (1000 tokens)
    to still be running while the 429 test sends the others. Request chat templates are
    trusted (rendered under a time limit) and prompts may be 4 M characters long, for the
    tests of work kept off the event loop."""
    return start_server(no_template_dir, "--max-num-seqs", "1",
                        "--max-num-queued-requests", "1", "--max-model-len", "1024",
                        "--trust-request-chat-template", "--max-prompt-chars", "4000000")


@pytest.fixture
def client(server):
    """The official OpenAI client for the shared server."""
    import openai
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                       timeout=60.0) as c:
        yield c


@pytest.fixture
def http(server):
    """A raw httpx client for the shared server, authorised."""
    with httpx.Client(base_url=server.url, timeout=60.0,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c

"""vLLM's `serve` flags on a live `sluice serve` (issue 14, item 2): real TLS with a self-signed
certificate and the official `openai` client, --root-path, --chat-template, the request log
(--enable-log-requests, --max-log-len, --disable-log-requests), --uvicorn-log-level, the
start-up lines of the no-effect flags, and `sluice chat` as a client of a running server.

Two servers: `tls_server` (HTTPS and most flags) and `plain_server` (defaults plus
--disable-log-requests, for `sluice chat`)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from _sluice_server_helpers import STARTUP_DEADLINE_S, server_env

KEY = "tls-key-456"
TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
_LAUNCH = "import sys; from sluice.entrypoints.cli import main; sys.exit(main())"


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(start_server, llama_dir, tls_files, tmp_path_factory):
    key, cert = tls_files
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    server = start_server(
        llama_dir, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--root-path", "/api",
        "--api-key", KEY, "--chat-template", str(template), "--enable-log-requests",
        "--max-log-len", "12", "--uvicorn-log-level", "warning", "--enforce-eager",
        "--swap-space", "4", "--trust-remote-code", "--kv-cache-dtype", "bfloat16",
        "--dtype", "float", wait=False)
    server.url = server.url.replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(cert))
    end = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise RuntimeError(f"sluice serve exited:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", verify=context, timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        raise RuntimeError(f"sluice serve not healthy:\n{server.log()[-3000:]}")
    server.ssl_context = context
    return server


@pytest.fixture(scope="module")
def plain_server(start_server, llama_dir):
    return start_server(llama_dir, "--disable-log-requests")


@pytest.fixture
def tls_http(tls_server):
    with httpx.Client(base_url=tls_server.url, verify=tls_server.ssl_context, timeout=60.0,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_openai_client_over_tls(tls_server):
    import openai
    with httpx.Client(verify=tls_server.ssl_context, timeout=60.0) as http_client:
        client = openai.OpenAI(base_url=tls_server.url + "/v1", api_key=KEY, max_retries=0,
                               http_client=http_client)
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": "hello there friend"}])
    assert reply.choices[0].finish_reason in ("length", "stop")
    # the rendered prompt is the --chat-template's: "<<hello there friend>>"
    with httpx.Client(verify=tls_server.ssl_context) as c:
        count = c.post(tls_server.url + "/tokenize", headers={"Authorization": f"Bearer {KEY}"},
                       json={"messages": [{"role": "user", "content": "hello there friend"}],
                             "add_special_tokens": False}).json()["count"]
    assert reply.usage.prompt_tokens == count


def test_tls_is_real(tls_server):
    with pytest.raises(httpx.ConnectError):  # the certificate is not in the default store
        httpx.get(tls_server.url + "/health", timeout=10.0)
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the port
        httpx.get(tls_server.url.replace("https://", "http://") + "/health", timeout=10.0)
    assert f"on https://127.0.0.1:{tls_server.port}" in tls_server.log()


def test_chat_template_renders_every_chat_request(tls_http):
    tokens = tls_http.post("/tokenize", json={
        "messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
        "add_special_tokens": False}).json()["tokens"]
    text = tls_http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text == "<<one>><<two>>"


def test_root_path(tls_http, tls_server):
    assert tls_http.get("/openapi.json").json()["servers"] == [{"url": "/api"}]
    # routes answer where the proxy forwards them, and /health stays public under the prefix
    assert tls_http.get("/v1/models").status_code == 200
    with httpx.Client(base_url=tls_server.url, verify=tls_server.ssl_context) as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/v1/models").status_code == 401


def test_request_log_and_uvicorn_level(tls_http, tls_server):
    model = tls_http.get("/v1/models").json()["data"][0]["id"]
    r = tls_http.post("/v1/completions", json={"model": model, "max_tokens": 2,
                                               "prompt": "abcdefghijklmnopqrstuvwxyz"})
    assert r.status_code == 200, r.text
    lines = [l for l in tls_server.log().splitlines() if "Received request" in l]
    line = next(l for l in lines if "abcdefghijkl" in l)
    assert "prompt: 'abcdefghijkl'," in line and "abcdefghijklm" not in line  # --max-log-len 12
    assert "max_tokens=2" in line and "prompt_token_ids: [" in line
    # --uvicorn-log-level warning: none of uvicorn's INFO lines (startup, access log)
    assert "Application startup complete" not in tls_server.log()
    assert '"POST /v1/completions' not in tls_server.log()


def test_no_effect_flags_log_one_line_each(tls_server):
    log = tls_server.log()
    for start in ("--enforce-eager has no effect on cpu", "--swap-space 4 has no effect on cpu",
                  "--trust-remote-code has no effect"):
        assert log.count(start) == 1, start


def test_disable_log_requests(plain_server):
    r = httpx.post(plain_server.url + "/v1/completions", timeout=60, json={
        "model": plain_server_model(plain_server), "prompt": "quiet please", "max_tokens": 2})
    assert r.status_code == 200
    log = plain_server.log()
    assert "Received request" not in log and "quiet please" not in log
    assert "Application startup complete" in log  # uvicorn's INFO lines at the default level


def _successes(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def _wait_successes(server, at_least: float) -> float:
    deadline = time.monotonic() + 30
    while (n := _successes(server)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def run_chat(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LAUNCH, "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, env=server_env())


def test_sluice_chat_quick_and_interactive(plain_server):
    before = _successes(plain_server)
    quick = run_chat("--url", plain_server.url + "/v1", "--quick", "hi", "--max-tokens", "3")
    assert quick.returncode == 0, quick.stderr
    assert _wait_successes(plain_server, before + 1) == before + 1
    session = run_chat("--url", plain_server.url + "/v1", "--system-prompt", "be brief",
                       "--model", plain_server_model(plain_server), "--max-tokens", "3",
                       stdin="first\n\nsecond\n")
    assert session.returncode == 0, session.stderr
    assert _wait_successes(plain_server, before + 3) == before + 3  # one request per line


def plain_server_model(server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def test_sluice_chat_reports_server_errors(plain_server):
    result = run_chat("--url", plain_server.url + "/v1", "--model-name", "no-such-model",
                      "--quick", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: the server at {plain_server.url}/v1 answered 404")

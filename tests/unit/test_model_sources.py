"""Model sources as users name them (`model_spec.resolve`): a local directory, a hub id read
from a local Hugging Face cache tree with HF_HUB_OFFLINE=1 (no network call), and clear one-line
errors naming every place looked at."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sluice.config_sources import build_engine_config
from sluice.errors import ModelLoadError
from sluice.model_spec.hf import looks_like_hub_id
from sluice.model_spec.resolve import resolve_model, resolve_model_config

REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache tree for `repo_id` (refs/main -> one snapshot holding the files of
    `model_dir`), as `huggingface_hub` writes it; returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_shapes():
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert looks_like_hub_id("org/name.v2")
    for name in ("name", "/abs/path", "a/b/c", "../x", "org/", "a b/c"):
        assert not looks_like_hub_id(name), name


def test_local_directory_resolves_to_itself(llama_dir):
    cfg = build_engine_config(overrides={"model": str(llama_dir)}, env={})
    assert resolve_model_config(cfg) is cfg


def test_hub_id_from_the_local_cache_offline(llama_dir, tmp_path, offline):
    snapshot = make_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", llama_dir)
    cfg = build_engine_config(overrides={"model": "tiny-org/tiny-llama",
                                         "download_dir": str(tmp_path / "hub")}, env={})
    resolved = resolve_model_config(cfg)
    assert Path(resolved.model.model) == snapshot
    assert resolved.model.served_model_name == ("tiny-org/tiny-llama",)  # as the user typed
    assert resolve_model_config(resolved) is resolved  # idempotent


def test_hub_id_at_a_revision(llama_dir, tmp_path, offline):
    snapshot = make_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", llama_dir)
    assert resolve_model("tiny-org/tiny-llama", revision=REVISION,
                         download_dir=str(tmp_path / "hub")) == snapshot


def test_missing_hub_model_offline_names_every_place(tmp_path, offline, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        resolve_model("no-org/no-model", download_dir=str(tmp_path / "hub"))
    message = str(e.value)
    assert "\n" not in message
    assert str(tmp_path / "no-org" / "no-model") in message  # the local directory looked at
    assert str(tmp_path / "hub") in message                  # the cache looked at
    assert "HF_HUB_OFFLINE=1" in message and "not asked" in message


def test_missing_path_and_non_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found: not a local directory"):
        resolve_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="GGUF file .* not found"):
        resolve_model(str(tmp_path / "model.gguf"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_model(str(text))
    with pytest.raises(ModelLoadError, match="needs a .gguf file"):
        resolve_model(str(tmp_path), load_format="gguf")


def test_gguf_file_with_safetensors_format_is_refused_before_conversion(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 60)  # the magic is enough to call it a GGUF file
    with pytest.raises(ModelLoadError, match="--load-format safetensors"):
        resolve_model(str(fake), load_format="safetensors")

"""GGUF files as a model source: tiny random-weight models converted the way llama.cpp does
(`_gguf_helpers.write_gguf`), loaded through `prepare_gguf` + the normal loader, against the
same models loaded from safetensors.

Tolerances:
* Layout (names, reversed dims, llama's Q/K permutation): F32 files must give the checkpoint's
  tensors bit for bit, and quantized files exactly gguf-py's own quantize -> dequantize round
  trip of them (quantization is row-wise, so it commutes with the row permutation). Same weights
  and the same sluice code then give bit-identical logits (asserted for F32 files against the
  checkpoint, and for quantized files against a checkpoint of their dequantized weights).
* Quantized files vs the float checkpoint: the only difference is the quantization error of the
  weights. Its size differs by type — relative RMS error of the weights ~2e-4 (F16), 2e-3
  (BF16), 5e-3 (Q8_0), 4e-2 (Q5_*), 8e-2 (Q4_*) — and the 2-layer model turns it into a relative
  RMS error of the logits ~3x as large, for every type (observed 2.9..3.3). So each type is held
  to its own tolerance: logits' relative error within `ERROR_GAIN` = [1.5, 4.5] x its weights'
  (e.g. <= 0.024 for Q8_0, <= 0.39 for Q4_0; max |diff| ~2e-3 for F16, ~1 for Q4 on logits of
  std 0.7). A file written without llama's Q/K permutation gives 0.32 even at F32 (checked, so
  the exact checks above can fail).
* k-quants (gguf-py cannot write them): random valid blocks, decoded by sluice (through gguf-py)
  and by `_gguf_helpers.reference_dequantize` (transcribed from ggml-quants.c) must agree to
  float32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from _gguf_helpers import (BLOCK_BYTES, BLOCK_ELEMS, QK_K, dequantize_like_gguf, gguf_name,
                           llama3_rope_freqs, llama_cpp_unpermute, load_hf_tensors,
                           random_kquant_blocks, reference_dequantize, write_gguf)
from _sluice_model_helpers import PagedRunner, load_ours, prompts, randomize_vectors
from sluice.errors import ModelLoadError
from sluice.frontend.tokenizer import load_tokenizer
from sluice.hf_config import load_model_spec
from sluice.model.gguf_weights import iterate_gguf
from sluice.model.loader import weight_source
from sluice.model_spec.gguf import (GGUF_MARKER, SMALL_ARRAY_ITEMS, field_value, inspect_gguf,
                                    is_gguf_file, open_gguf, prepare_gguf, read_marker,
                                    skipped_array)
from sluice.model_spec.gguf_config import llama3_factors, llama3_rope_scaling
from sluice.testing.tiny_models import TinyModelSpec

MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
          "qwen3_hd32")
QUANT_TYPES = ("F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
ERROR_GAIN = (1.5, 4.5)
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")   # independent decoders
LENGTHS = [5, 17, 33, 1]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_model_factory, tmp_path_factory):
    """name -> model dir with random norms/biases (HF's ones/zeros would hide a skipped one)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            src = (tiny_model_factory(name, TinyModelSpec(architecture="Qwen3ForCausalLM",
                                                          extra={"head_dim": 32}))
                   if name == "qwen3_hd32" else tiny_model_dir(name))
            cache[name] = randomize_vectors(src, tmp_path_factory.mktemp("gguf-src") / name)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def gguf_files(models, tmp_path_factory):
    """(model name, type, permute) -> a GGUF file converted from it; cached."""
    root = tmp_path_factory.mktemp("gguf-files")
    cache: dict[tuple, Path] = {}

    def get(name: str, qtype: str = "F32", permute: bool = True) -> Path:
        key = (name, qtype, permute)
        if key not in cache:
            cache[key] = write_gguf(models(name), root / f"{name}-{qtype}-{permute}.gguf", qtype,
                                    permute=permute)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sidecars")


def logits_of(model_dir: Path) -> dict[str, torch.Tensor]:
    model = load_ours(model_dir)
    runner = PagedRunner(model)
    ps = prompts(model.spec.vocab_size, LENGTHS)
    for i, p in enumerate(ps):
        runner.add(str(i), p)
    return runner.step([(str(i), len(p)) for i, p in enumerate(ps)])


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- layout --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_f32_weights_are_the_checkpoint_bit_for_bit(models, gguf_files, name):
    expected = load_hf_tensors(models(name))
    got = dict(iterate_gguf(gguf_files(name), torch.float32))
    assert set(got) == set(expected) - {"lm_head.weight"} | ({"lm_head.weight"} & set(got))
    for hf_name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, torch.from_numpy(expected[hf_name])), hf_name


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_quantized_weights_are_gguf_py_round_trip(models, gguf_files, name, qtype):
    """Llama: the permuted case; Qwen2: biases, no permutation."""
    expected = load_hf_tensors(models(name))
    for hf_name, tensor in iterate_gguf(gguf_files(name, qtype), torch.float32):
        want = expected[hf_name]
        want = dequantize_like_gguf(want, qtype) if want.ndim == 2 else want
        assert torch.equal(tensor, torch.from_numpy(want)), hf_name


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_open_gguf_reads_what_gguf_py_reads(gguf_files, qtype):
    """`open_gguf`'s faster header parsing (a plain-ndarray view of the mapping) gives every
    metadata field (the tokenizer's arrays included) and every tensor exactly as gguf-py's
    own reader does, and `iterate_gguf` over that open reader the same tensors as over the
    path."""
    import gguf

    path = gguf_files("LlamaForCausalLM", qtype)
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert type(ours) is not gguf.GGUFReader   # the fast subclass is in use with this gguf
    assert list(ours.fields) == list(theirs.fields)
    assert len(ours.fields["tokenizer.ggml.tokens"].data) > 100
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert (mine.types, mine.data, mine.offset) == (field.types, field.data, field.offset), key
        assert len(mine.parts) == len(field.parts), key
        for a, b in zip(mine.parts, field.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b), key
        assert field_value(ours, key) == field_value(theirs, key), key
    assert [(t.name, t.tensor_type, t.data_offset, t.shape.tolist()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data_offset, t.shape.tolist()) for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
    from_path = dict(iterate_gguf(path, torch.float32))
    from_reader = dict(iterate_gguf(ours, torch.float32))
    assert from_path.keys() == from_reader.keys()
    assert all(torch.equal(from_path[k], from_reader[k]) for k in from_path)
    _check_arrays_skipped(open_gguf(path, metadata_arrays=False), theirs)


def _check_arrays_skipped(lean, full) -> None:
    """`lean` (open_gguf(metadata_arrays=False)) against `full` (gguf-py's reader, same file):
    the same fields in order, scalars equal, arrays stepped over with their lengths kept and
    refused by `field_value`, the same tensors and bytes."""
    import gguf

    assert list(lean.fields) == list(full.fields)
    skipped = 0
    for key, field in full.fields.items():
        mine = lean.fields[key]
        assert mine.offset == field.offset, key
        if field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > SMALL_ARRAY_ITEMS:
            assert skipped_array(mine) and int(mine.parts[-1][0]) == len(field.data), key
            with pytest.raises(ValueError, match="stepped over"):
                field_value(lean, key)
            skipped += 1
        else:
            assert not skipped_array(mine), key
            assert field_value(lean, key) == field_value(full, key), key
    assert skipped > 0
    for a, b in zip(lean.tensors, full.tensors, strict=True):
        assert (a.name, a.tensor_type, a.data_offset) == (b.name, b.tensor_type, b.data_offset)
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_arrays_skipped_reader_steps_over_strings_in_either_byte_order(tmp_path, endian):
    """String arrays are stepped over by their byte counts, read in the file's byte order."""
    import gguf

    path = tmp_path / f"{endian}.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian[endian])
    writer.add_array("tokenizer.ggml.tokens", ["a", "bcd", "", "é" * 300] * 5)
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0, 3.0] * 5)
    writer.add_array("general.tags", ["short", "kept"])
    writer.add_uint32("llama.attention.head_count", 7)
    writer.add_string("general.name", "after the arrays")
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _check_arrays_skipped(open_gguf(path, metadata_arrays=False), gguf.GGUFReader(path))


def test_weights_come_in_the_requested_dtype(gguf_files):
    for _, tensor in iterate_gguf(gguf_files("LlamaForCausalLM", "Q8_0"), torch.bfloat16):
        assert tensor.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def kquant_model(tiny_model_factory) -> Path:
    """Rows of 256 (the k-quant block): hidden 256, intermediate 512, 4 heads of 64."""
    return tiny_model_factory("llama_h256", TinyModelSpec(hidden_size=256, intermediate_size=512,
                                                          num_attention_heads=4,
                                                          num_key_value_heads=2))


@pytest.mark.parametrize("qtype", K_TYPES)
def test_kquant_dequantization_matches_ggml_reference(kquant_model, tmp_path, qtype):
    """Every 2-D weight as random k-quant blocks; sluice's HF-layout tensors must equal the
    reference decoder's output with llama.cpp's Q/K permutation undone."""
    import gguf

    rng = np.random.default_rng(0)
    cfg = json.loads((kquant_model / "config.json").read_text())
    raw, expected = {}, {}
    for hf_name, values in load_hf_tensors(kquant_model).items():
        if values.ndim != 2:
            continue
        rows, cols = values.shape
        elems = BLOCK_ELEMS.get(qtype, QK_K)
        blocks = random_kquant_blocks(qtype, rows * cols // elems, rng)
        decoded = reference_dequantize(qtype, blocks).reshape(rows, cols)
        name = gguf_name(hf_name)
        if ".attn_q." in name or ".attn_k." in name:   # the file holds llama.cpp's row order
            decoded = llama_cpp_unpermute(decoded, cfg["num_attention_heads"] if ".attn_q." in
                                          name else cfg["num_key_value_heads"])
        raw[name] = (blocks.reshape(rows, cols // elems * BLOCK_BYTES[qtype]),
                     gguf.GGMLQuantizationType[qtype])
        expected[hf_name] = decoded
    path = write_gguf(kquant_model, tmp_path / f"{qtype}.gguf", raw_tensors=raw)
    assert inspect_gguf(path).tensor_types[qtype] == len(raw)
    seen = 0
    for hf_name, tensor in iterate_gguf(path, torch.float32):
        if hf_name in expected:
            np.testing.assert_allclose(tensor.numpy(), expected[hf_name], rtol=1e-6, atol=1e-9,
                                       err_msg=hf_name)
            assert np.abs(expected[hf_name]).max() > 1e-3      # not trivially zero
            seen += 1
    assert seen == len(expected)


# ---- logits --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_f32_gguf_logits_equal_safetensors_logits(models, gguf_files, cache_root, name):
    sidecar = prepare_gguf(gguf_files(name), cache_root)
    ours, ref = logits_of(sidecar), logits_of(models(name))
    assert max_diff(ours, ref) == 0.0


def dequantized_checkpoint(model_dir: Path, qtype: str, out: Path) -> Path:
    """A copy of `model_dir` whose 2-D weights are gguf-py's dequantization of `qtype`."""
    import shutil

    from safetensors.numpy import save_file
    shutil.copytree(model_dir, out)
    tensors = {name: dequantize_like_gguf(w, qtype) if w.ndim == 2 else w
               for name, w in load_hf_tensors(model_dir).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all logits."""
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    return (num / sum(float(b[k].pow(2).sum()) for k in b)) ** 0.5


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantized_gguf_logits(models, gguf_files, cache_root, tmp_path, qtype):
    """Exact against a checkpoint holding the same dequantized weights; against the float
    checkpoint, off by the quantization error only: the logits' relative error is
    `ERROR_GAIN` times the weights' (||dequant(W) - W|| / ||W|| over all 2-D weights)."""
    src = models("LlamaForCausalLM")
    ours = logits_of(prepare_gguf(gguf_files("LlamaForCausalLM", qtype), cache_root))
    assert max_diff(ours, logits_of(dequantized_checkpoint(src, qtype, tmp_path / "dq"))) == 0.0
    weights = [w for w in load_hf_tensors(src).values() if w.ndim == 2]
    weight_error = (sum(float(((dequantize_like_gguf(w, qtype) - w) ** 2).sum())
                        for w in weights) / sum(float((w ** 2).sum()) for w in weights)) ** 0.5
    gain = relative_error(ours, logits_of(src)) / weight_error
    assert ERROR_GAIN[0] <= gain <= ERROR_GAIN[1], (qtype, weight_error, gain)


def test_missing_qk_permutation_is_caught(models, gguf_files, cache_root):
    """The negative control for the exact checks above: a llama file whose Q/K rows were not
    permuted by the converter is read as if they were, which pairs the wrong RoPE dims."""
    broken = logits_of(prepare_gguf(gguf_files("LlamaForCausalLM", permute=False), cache_root))
    assert relative_error(broken, logits_of(models("LlamaForCausalLM"))) > 0.1


# ---- the sidecar ---------------------------------------------------------------------------

SPEC_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
               "rms_norm_eps", "rope", "tie_word_embeddings", "attention_bias", "qk_norm",
               "hidden_act", "eos_token_ids", "bos_token_id")


@pytest.mark.parametrize("name", MODELS)
def test_sidecar_describes_the_checkpoint(models, gguf_files, cache_root, name):
    gguf_path = gguf_files(name)
    sidecar = prepare_gguf(gguf_path, cache_root)
    ours, ref = load_model_spec(sidecar), load_model_spec(models(name))
    for field in SPEC_FIELDS:
        assert getattr(ours, field) == getattr(ref, field), field
    expected_arch = "LlamaForCausalLM" if name == "MistralForCausalLM" else ref.architecture
    assert ours.architecture == expected_arch
    assert read_marker(sidecar) == gguf_path.absolute()
    assert json.loads((sidecar / GGUF_MARKER).read_text()) == {"gguf_file": str(gguf_path)}
    assert json.loads((sidecar / "generation_config.json").read_text())["eos_token_id"] == 0
    tok, ref_tok = load_tokenizer(sidecar), load_tokenizer(models(name))
    for text in ["Hello world, this is a test.", "  two spaces\n\ttab", "héllo 漢字 ✓",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == ref_tok.encode(text), text
    assert (tok.bos_token, tok.eos_token, tok.all_special_ids) == \
        (ref_tok.bos_token, ref_tok.eos_token, ref_tok.all_special_ids)
    chat = [{"role": "user", "content": "hi"}]
    assert tok.chat_template == ref_tok.chat_template
    assert tok.apply_chat_template(chat) == ref_tok.apply_chat_template(chat)
    info = inspect_gguf(gguf_path)
    assert info.architecture == ("llama" if "Llama" in expected_arch else ref.model_type)
    assert info.tensor_types == {"F32": info.num_tensors}


def test_llama3_rope_factors_become_llama3_rope_scaling(tiny_model_factory, tmp_path,
                                                        cache_root):
    """llama.cpp stores Llama-3 RoPE as per-frequency factors (`rope_freqs`); the sidecar must
    turn them back into a rope_scaling that gives the same rotations (here with non-default
    low/high/original values, so the fit is exercised)."""
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model_factory("gguf_rope_llama3", TinyModelSpec(
        extra={"rope_parameters": {"rope_theta": 10000.0, **params}}))
    freqs = llama3_rope_freqs(10000.0, 16, 8.0, 1.0, 4.0, 64)
    assert ((freqs > 1.0) & (freqs < 8.0)).sum() >= 2      # blended frequencies to fit on
    sidecar = prepare_gguf(write_gguf(model, tmp_path / "l3.gguf", rope_freqs=freqs), cache_root)
    spec = load_model_spec(sidecar)
    assert spec.rope.rope_type == "llama3" and spec.rope.scaling["factor"] == 8.0
    torch.testing.assert_close(logits_of(sidecar), logits_of(model), atol=5e-5, rtol=0)


def test_linear_rope_scaling_and_unsupported_kinds(tiny_model_factory, tmp_path, cache_root):
    model = tiny_model_factory("gguf_rope_linear", TinyModelSpec(
        extra={"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear",
                                   "factor": 2.0}}))
    sidecar = prepare_gguf(write_gguf(model, tmp_path / "linear.gguf",
                                      rope_scaling=("linear", 2.0)), cache_root)
    assert load_model_spec(sidecar).rope == load_model_spec(model).rope
    assert max_diff(logits_of(sidecar), logits_of(model)) == 0.0
    yarn = write_gguf(model, tmp_path / "yarn.gguf", rope_scaling=("yarn", 4.0))
    with pytest.raises(ModelLoadError, match="yarn.gguf: RoPE scaling type 'yarn'"):
        inspect_gguf(yarn)


def test_llama3_rope_scaling_fit():
    # Llama 3.1 8B: theta 5e5, head_dim 128, factor 8 with the default low/high/original.
    freqs = llama3_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    assert llama3_rope_scaling(freqs, 500000.0, 128, Path("x.gguf")) == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    fitted = llama3_rope_scaling(llama3_factors(500000.0, 128, 32.0, 2.0, 6.0, 4096),
                                 500000.0, 128, Path("x.gguf"))
    assert fitted is not None
    assert llama3_factors(500000.0, 128, **{k: v for k, v in fitted.items() if k != "rope_type"}) \
        == pytest.approx(llama3_factors(500000.0, 128, 32.0, 2.0, 6.0, 4096), rel=1e-6)
    assert llama3_rope_scaling([1.0] * 64, 500000.0, 128, Path("x.gguf")) is None
    with pytest.raises(ModelLoadError, match="x.gguf.*match no Llama-3"):
        llama3_rope_scaling(list(np.linspace(1, 8, 64)[::-1]), 500000.0, 128, Path("x.gguf"))


# ---- errors --------------------------------------------------------------------------------

def _patch_first_tensor_type(path: Path, type_id: int) -> None:
    import gguf
    reader = gguf.GGUFReader(path)
    field = reader.tensors[0].field
    offset = field.offset + sum(int(p.nbytes) for p in field.parts[:4])   # name, n_dims, dims
    del reader
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.uint32(type_id).tobytes())


def _broken_files(gguf_files, models, root: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (file, a regex the error must match)."""
    import gguf

    good = gguf_files("LlamaForCausalLM").read_bytes()
    files: dict[str, tuple[Path, str]] = {}

    def put(kind: str, data: bytes, pattern: str) -> None:
        path = root / f"{kind}.gguf"
        path.write_bytes(data)
        files[kind] = (path, pattern)

    put("not_gguf", b"PK\x03\x04 a zip, not a model" * 10, "not a GGUF file")
    put("empty", b"", "not a GGUF file")
    put("truncated_header", good[:200], "not a readable GGUF file: truncated")
    put("truncated_data", good[:len(good) - 1000], "truncated")
    put("garbage_header", good[:8] + bytes([0xFF] * 64) + good[72:],
        "not a readable GGUF file: truncated or corrupt")
    src = models("LlamaForCausalLM")
    files["unknown_arch"] = (write_gguf(src, root / "falcon.gguf", arch="falcon"),
                             "architecture 'falcon' is not supported")
    unknown = write_gguf(src, root / "unknown_type.gguf")
    _patch_first_tensor_type(unknown, 99)
    files["unknown_type"] = (unknown, "not a readable GGUF file: unknown tensor type .*99")
    q8_1 = np.zeros((128, 160), np.uint8)  # [128, 128] in blocks of 32 -> 40 bytes
    files["unsupported_type"] = (write_gguf(src, root / "q8_1.gguf", raw_tensors={
        "blk.0.ffn_up.weight": (q8_1, gguf.GGMLQuantizationType.Q8_1)}),
        "Q8_1 .*not supported")
    files["unknown_tensor"] = (write_gguf(src, root / "extra.gguf", raw_tensors={
        "blk.0.ffn_gate_exps.weight": (np.zeros((4, 4), np.float32), None)}),
        "blk.0.ffn_gate_exps.weight are not part of the llama architecture")
    tensors = load_hf_tensors(src)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    files["missing_tensor"] = (write_gguf(src, root / "missing.gguf", tensors=tensors),
                               "tensors missing .*blk.1.ffn_up.weight")
    return files


BROKEN = ("not_gguf", "empty", "truncated_header", "truncated_data", "garbage_header",
          "unknown_arch", "unknown_type", "unsupported_type", "unknown_tensor", "missing_tensor")


@pytest.fixture(scope="module")
def broken_files(gguf_files, models, tmp_path_factory):
    return _broken_files(gguf_files, models, tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("kind", BROKEN)
def test_bad_files_raise_one_line_naming_the_file(broken_files, tmp_path, kind):
    path, pattern = broken_files[kind]
    with pytest.raises(ModelLoadError, match=pattern) as e:
        inspect_gguf(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    assert is_gguf_file(path) == (kind not in ("not_gguf", "empty"))
    with pytest.raises(ModelLoadError, match=pattern):
        prepare_gguf(path, tmp_path)
    assert not any((tmp_path / "gguf").glob("*")) if (tmp_path / "gguf").exists() else True


def test_truncated_file_fails_in_the_weight_reader_too(broken_files):
    path, _ = broken_files["truncated_data"]
    with pytest.raises(ModelLoadError, match=str(path)):
        list(iterate_gguf(path, torch.float32))


def test_load_format_rules(llama_dir, gguf_files, cache_root):
    sidecar = prepare_gguf(gguf_files("LlamaForCausalLM"), cache_root)
    assert weight_source(sidecar, "dummy") is None
    assert weight_source(sidecar, "gguf") is not None and weight_source(sidecar, "auto")
    with pytest.raises(ModelLoadError, match="sidecar of GGUF file .*holds no safetensors"):
        weight_source(sidecar, "safetensors")
    with pytest.raises(ModelLoadError, match="needs a .gguf file"):
        weight_source(llama_dir, "gguf")
    with pytest.raises(ModelLoadError, match="'bogus' is not supported; choose auto"):
        weight_source(llama_dir, "bogus")


# ---- caching, races, torch-free ------------------------------------------------------------

PREPARE_IN_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sluice.model_spec.gguf import prepare_gguf
    path = prepare_gguf(sys.argv[1], Path(sys.argv[2]))
    assert "torch" not in sys.modules, "prepare_gguf imported torch"
    print(path)
""")


def test_prepare_gguf_is_cached_atomic_and_torch_free(gguf_files, tmp_path):
    """Two processes racing on an empty cache both get the same complete sidecar, without
    importing torch; later calls reuse it; a changed file gets a new one."""
    gguf_path = gguf_files("Qwen2ForCausalLM")
    root = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_IN_CHILD, str(gguf_path),
                               str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    sidecar = Path(paths.pop())
    assert sorted(p.name for p in (root / "gguf").iterdir()) == [sidecar.name]   # no temp dirs
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            GGUF_MARKER} <= {p.name for p in sidecar.iterdir()}

    (sidecar / "sentinel").write_text("kept")
    assert prepare_gguf(gguf_path, root) == sidecar                 # cached: not rebuilt
    assert (sidecar / "sentinel").is_file()

    st = gguf_path.stat()
    os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        changed = prepare_gguf(gguf_path, root)
    finally:
        os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changed != sidecar and (changed / GGUF_MARKER).is_file()


def test_default_cache_root_is_sluice_cache_dir(gguf_files, tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    sidecar = prepare_gguf(gguf_files("LlamaForCausalLM"))
    assert sidecar.parent == tmp_path / "gguf"


def test_llm_runs_a_gguf_file_like_its_checkpoint(models, gguf_files, tmp_path, monkeypatch):
    """`LLM(model="x.gguf")`: the resolve stage prepares the sidecar, the engine loads the
    GGUF weights; greedy tokens equal those of the safetensors checkpoint."""
    from sluice.frontend.llm import LLM
    from sluice.sampling_params import SamplingParams

    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    texts = ["The quick brown fox", "def main():", "Numbers: 1, 2, 3,"]
    runs = []
    for model in (gguf_files("LlamaForCausalLM"), models("LlamaForCausalLM")):
        with LLM(str(model), kv_cache_memory="16MiB", max_model_len=256) as llm:
            runs.append([o.outputs[0].token_ids for o in
                         llm.generate(texts, params, use_tqdm=False)])
    assert runs[0] == runs[1]
    assert all(len(t) == 12 for t in runs[0])

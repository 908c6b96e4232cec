"""GGUF files (llama.cpp's single-file format) as a model source. No torch.

Contract:
* `is_gguf_file(path)` — the file starts with the GGUF magic (the suffix is not trusted).
* `inspect_gguf(path) -> GGUFInfo` — parses the header with the `gguf` package (memory-mapped;
  tensor data is not read) and validates everything that can be known before weights are
  touched: the magic and header, every tensor's bytes lying inside the file (a truncated
  download), the architecture (`GGUF_ARCHITECTURES`), every tensor type
  (`SUPPORTED_TENSOR_TYPES`), every tensor name (`hf_tensor_name`) and the hyper-parameters
  (`gguf_config.hf_config`). Any problem is one `ModelLoadError` line naming the file.
* `open_gguf(path, metadata_arrays=True) -> GGUFReader` — the `gguf` package's reader
  (memory-mapped), its header parsed ~3x faster than `gguf.GGUFReader` does it
  (`_fast_reader_class`), or ~30x with `metadata_arrays=False` (the weight loader's: the
  tokenizer's arrays stepped over), and every tensor's bytes checked to lie inside the file;
  `gguf_reader(source)` passes an open reader through, so one model load parses the header
  once.
* `prepare_gguf(path, cache_root=None) -> Path` — the file's Hugging Face-format "sidecar"
  directory: config.json and generation_config.json (built here from the metadata, see
  `gguf_config`), tokenizer.json + tokenizer_config.json (+ chat_template.jinja) written by
  transformers' GGUF tokenizer converter, and the marker `GGUF_MARKER` =
  {"gguf_file": "<absolute path>"} that sends the weight loader to the GGUF file. transformers'
  GGUF code imports torch, so the tokenizer step runs in a short child process
  (`python -m sluice.model_spec.gguf tokenizer GGUF OUT_DIR`); the calling process stays
  torch-free.

  Cache layout: `<cache_root>/gguf/<stem>-<key>/`, key = sha256 of (absolute path, size,
  mtime_ns, sidecar format, transformers version), so an edited or replaced file gets a new
  sidecar. cache_root defaults to `$SLUICE_CACHE_DIR`, else `~/.cache/sluice`. A sidecar is
  built in a temporary sibling directory and renamed into place, so a process never sees a
  half-written one and two processes racing both end with the same complete directory.

Tensor names: GGUF `blk.N.<part>.<weight|bias>` and a few globals map to HF names by
`hf_tensor_name`; `rope_freqs.weight` (llama.cpp's Llama-3 RoPE factors) is consumed into
config.json's `rope_scaling` and is not a weight.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.errors import ModelLoadError

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUF_MAGIC = b"GGUF"
GGUF_MARKER = "sluice_gguf.json"
"""The file in a sidecar directory naming its GGUF weights: {"gguf_file": "<absolute path>"}."""
SMALL_ARRAY_ITEMS = 16
"""Metadata arrays up to this length are always parsed (`GGUFInfo.metadata` holds them)."""
SIDECAR_FORMAT = 1
"""Bumped whenever what a sidecar holds changes, so old caches are rebuilt."""

# GGUF general.architecture -> the HF architecture sluice runs. Mistral models are converted
# by llama.cpp under the "llama" architecture (no sliding window recorded), so they run as
# LlamaForCausalLM, exactly as llama.cpp runs them.
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                      "qwen3": "Qwen3ForCausalLM"}
# Types whose dequantization is checked by tests/model/test_gguf.py (float types and the legacy
# quants end to end; the k-quants and IQ4_NL / IQ4_XS against an independent reference decoder;
# DEQUANTIZED_TYPES end to end against gguf-py's decoder).
# IQ4_NL and IQ4_XS are kept in their blocks like the legacy and k-quants.
DEQUANTIZED_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                     "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "Q1_0")
"""Types sluice has no block kernels for: gguf-py dequantizes them at load (Q1_0, which it
cannot decode: `gguf_weights.dequantize_q1_0`); where int8 activations run every step the
linear layers run as blocks of a kernel type instead (`sluice.model.gguf_quant`). Every other
GGUF type (the Q8_1 / Q8_K intermediates, integer tensors) is refused at load, naming the
tensor."""
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
                          *DEQUANTIZED_TYPES)

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_PARTS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
NON_WEIGHT_TENSORS = ("rope_freqs.weight",)
"""GGUF tensors that are metadata for sluice (folded into config.json), not model weights."""


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF checkpoint name of GGUF tensor `gguf_name`, or None if it has none
    (e.g. `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_NAME.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK_PARTS:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"


def required_tensors(arch: str, config: dict[str, Any]) -> set[str]:
    """GGUF names every layer of `config` needs (output.weight is optional: tied when absent)."""
    parts = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
             "ffn_up", "ffn_down"]
    if arch == "qwen3":
        parts += ["attn_q_norm", "attn_k_norm"]
    names = {"token_embd.weight", "output_norm.weight"}
    for i in range(config["num_hidden_layers"]):
        names.update(f"blk.{i}.{part}.weight" for part in parts)
        if config["attention_bias"]:
            names.update(f"blk.{i}.attn_{x}.bias" for x in ("q", "k", "v"))
    return names


@dataclass(frozen=True)
class GGUFInfo:
    """What `inspect_gguf` found in a valid GGUF file."""
    path: Path                       # absolute
    file_size: int
    architecture: str                # GGUF general.architecture, e.g. "llama"
    hf_architecture: str             # e.g. "LlamaForCausalLM"
    name: str | None                 # general.name
    num_tensors: int
    tensor_types: dict[str, int]     # type name -> number of tensors, e.g. {"Q4_K": 154, ...}
    metadata: dict[str, Any]         # every scalar key (and arrays of <= SMALL_ARRAY_ITEMS)
    config: dict[str, Any]           # the config.json the sidecar will hold


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a regular file starting with the 4-byte GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path: str | Path, *, metadata_arrays: bool = True) -> GGUFReader:
    """A `gguf.GGUFReader` over `path` (memory-mapped), its header parsed and every tensor's
    bytes checked to lie inside the file. Raises `ModelLoadError` naming the file.
    `metadata_arrays=False` (for reading weights): the metadata's arrays (the tokenizer's
    vocabulary, merges, scores: ~90% of a header's parse time; those of more than
    SMALL_ARRAY_ITEMS items) are stepped over, not parsed; `field_value` refuses them
    (`skipped_array`), scalars, short arrays and tensors are read as ever."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist or is not a file.")
    if not is_gguf_file(path):
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF "
                             "magic bytes).")
    try:
        reader = _fast_reader_class(skip_arrays=not metadata_arrays)(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError,
            MemoryError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {_reader_error(e)}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise ModelLoadError(f"{path} is truncated: tensor {t.name} needs bytes up to "
                                 f"{end}, the file has {size}; re-download it.")
    return reader


@functools.cache
def _fast_reader_class(skip_arrays: bool = False) -> type[GGUFReader]:
    """`gguf.GGUFReader`, its header parsed ~3x faster (SmolLM2's 100 MB file: 2.9 s -> 0.9 s,
    most of a GGUF model's load time before): the reader takes a numpy view for every value
    of the metadata (~200k for a 49k-token vocabulary: tokens, scores, types, merges), and a
    view of its `np.memmap` costs ~10x one of a plain ndarray (memmap's `__getitem__` and
    `__array_finalize__`). This subclass slices a plain ndarray over the same mapping; the
    fields, tensors and their bytes are the same arrays' values (the views keep the mapping
    alive through their base). With `skip_arrays` a further subclass steps over metadata
    arrays (`open_gguf(metadata_arrays=False)`): such a field keeps its header parts (item
    type, length) and no items."""
    import inspect
    import struct

    import gguf
    import numpy as np

    def params(f: Any) -> list[str]:
        return list(inspect.signature(f).parameters)

    if params(gguf.GGUFReader._get) != ["self", "offset", "dtype", "count", "override_order"] \
            or params(gguf.GGUFReader._get_field_parts) != ["self", "orig_offs", "raw_type"]:
        return gguf.GGUFReader  # another gguf release: its own reader, as it is

    class FastHeaderReader(gguf.GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1,
                 override_order: str | None = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dt = np.dtype(dtype)
            count = int(count)
            arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    class ArraysSkippedReader(FastHeaderReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list,
                                                                           list]:
            if raw_type != gguf.GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            length = self._get(orig_offs + 4, np.uint64)
            n, offs = int(length[0]), orig_offs + 12
            if n <= SMALL_ARRAY_ITEMS:  # kept: `GGUFInfo.metadata` holds short arrays
                return super()._get_field_parts(orig_offs, raw_type)
            itype = gguf.GGUFValueType(raw_itype[0])
            scalar = self.gguf_scalar_to_np.get(itype)
            if scalar is not None:
                offs += n * np.dtype(scalar).itemsize
            elif itype == gguf.GGUFValueType.STRING:  # each: uint64 byte count, then bytes
                fmt, buf = ("<Q" if self.endianess == gguf.GGUFEndian.LITTLE else ">Q",
                            memoryview(self._plain))
                for _ in range(n):
                    offs += 8 + struct.unpack_from(fmt, buf, offs)[0]
            else:  # arrays of arrays: parsed as ever
                return super()._get_field_parts(orig_offs, raw_type)
            return offs - orig_offs, [raw_itype, length], [], [gguf.GGUFValueType.ARRAY, itype]

    return ArraysSkippedReader if skip_arrays else FastHeaderReader


def gguf_reader(source: str | Path | GGUFReader) -> GGUFReader:
    """For the weight readers: `source` itself when it is an open reader (one load parses a
    file's header once for every step that reads it), else `open_gguf(source,
    metadata_arrays=False)`."""
    if isinstance(source, (str, os.PathLike)):
        return open_gguf(source, metadata_arrays=False)
    return source


def _reader_error(e: Exception) -> str:
    """GGUFReader's exception in words: the two common causes named, others as they are."""
    from importlib.metadata import version

    text = str(e)
    if "cannot reshape array" in text:       # a tensor's bytes run past the end of the file
        return f"truncated (tensor data runs past the end of the file; re-download it): {text}"
    if "GGMLQuantizationType" in text:
        return (f"unknown tensor type ({text}); the file may need a newer gguf package than "
                f"{version('gguf')}")
    return f"truncated or corrupt ({type(e).__name__}: {text})"


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The metadata value at `key` as a Python value (str, int, float, bool, or a list of
    them), or `default` when absent."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return default
    types = list(field.types)

    def one(index: int, vtype: Any) -> Any:
        part = field.parts[index]
        if vtype == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part[0].item()
        if vtype == gguf.GGUFValueType.BOOL:
            return bool(value)
        if vtype == gguf.GGUFValueType.FLOAT32:   # shortest decimal: 1e-05, not 9.99999e-06
            return float(str(part[0]))
        return value

    if types and types[0] == gguf.GGUFValueType.ARRAY:
        if skipped_array(field):
            raise ValueError(f"GGUF metadata {key!r} is an array this reader stepped over "
                             "(open_gguf(metadata_arrays=False)); open the file with its arrays")
        return [one(i, types[-1]) for i in field.data]
    return one(field.data[0], types[0])


def skipped_array(field: Any) -> bool:
    """Whether `field` (a `ReaderField`) is a non-empty array whose items were stepped over
    (`open_gguf(metadata_arrays=False)`)."""
    import gguf

    return (bool(field.types) and field.types[0] == gguf.GGUFValueType.ARRAY
            and not field.data and len(field.parts) >= 2 and int(field.parts[-1][0]) > 0)


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if len(field.data) <= SMALL_ARRAY_ITEMS and not skipped_array(field):
            out[key] = field_value(reader, key)
    return out


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Validate the GGUF file `path` (see the module docstring) and describe it."""
    from sluice.model_spec.gguf_config import hf_config

    path = Path(path).expanduser().absolute()
    reader = open_gguf(path, metadata_arrays=False)  # the config reads scalars only
    arch = field_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                             f"{', '.join(GGUF_ARCHITECTURES)} (Mistral files use 'llama').")
    split_count = field_value(reader, "split.count", 1)
    if isinstance(split_count, int) and split_count > 1:
        raise ModelLoadError(f"{path} is one part of a split GGUF model; merge the parts into "
                             "one file first (llama-gguf-split --merge).")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    bad = sorted(set(types) - set(SUPPORTED_TENSOR_TYPES))
    if bad:
        holders = [t.name for t in reader.tensors if t.tensor_type.name in bad][:3]
        raise ModelLoadError(f"{path}: tensor type(s) {', '.join(bad)} (e.g. in "
                             f"{', '.join(holders)}) are not supported; supported: "
                             f"{', '.join(SUPPORTED_TENSOR_TYPES)}.")
    unknown = [t.name for t in reader.tensors
               if t.name not in NON_WEIGHT_TENSORS and hf_tensor_name(t.name) is None]
    if unknown:
        raise ModelLoadError(f"{path}: tensors {', '.join(unknown[:5])} are not part of the "
                             f"{arch} architecture sluice runs.")
    config = hf_config(reader, path)
    names = {t.name for t in reader.tensors}
    missing = sorted(required_tensors(arch, config) - names,
                     key=lambda n: [int(x) if x.isdigit() else x for x in n.split(".")])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise ModelLoadError(f"{path}: tensors missing for a {config['num_hidden_layers']}-layer "
                             f"{arch} model: {shown}.")
    return GGUFInfo(path=path, file_size=path.stat().st_size, architecture=arch,
                    hf_architecture=GGUF_ARCHITECTURES[arch],
                    name=field_value(reader, "general.name"), num_tensors=len(reader.tensors),
                    tensor_types=dict(types), metadata=_metadata(reader), config=config)


# ---- the sidecar directory -----------------------------------------------------------------

def default_cache_root() -> Path:
    """`$SLUICE_CACHE_DIR`, else `~/.cache/sluice`."""
    return Path(os.environ.get("SLUICE_CACHE_DIR") or Path.home() / ".cache" / "sluice")


def sidecar_key(path: Path) -> str:
    """16 hex digits covering the absolute path, size and mtime of `path`, the sidecar
    format and the transformers version (whose converter writes the tokenizer)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        tf_version = version("transformers")
    except PackageNotFoundError:
        tf_version = "none"
    st = path.stat()
    text = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{SIDECAR_FORMAT}\0{tf_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_marker(model_dir: str | Path) -> Path | None:
    """The GGUF file a sidecar directory's marker names, or None when `model_dir` holds no
    marker. Raises `ModelLoadError` for an unreadable marker or a GGUF file that is gone."""
    marker = Path(model_dir) / GGUF_MARKER
    if not marker.is_file():
        return None
    try:
        gguf_file = Path(json.loads(marker.read_text())["gguf_file"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{marker} is not a valid GGUF marker (need "
                             f'{{"gguf_file": "<path>"}}): {e}') from None
    if not gguf_file.is_file():
        raise ModelLoadError(f"{marker} names GGUF file {gguf_file}, which no longer exists; "
                             "pass the .gguf file again.")
    return gguf_file


def prepare_gguf(path: str | Path, cache_root: Path | None = None) -> Path:
    """The HF-format sidecar directory of the GGUF file `path`, built once and cached (see the
    module docstring). Raises `ModelLoadError` naming the file for an invalid GGUF file, a
    tokenizer that cannot be converted, or a cache directory that cannot be written."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist or is not a file.")
    root = (cache_root if cache_root is not None else default_cache_root()) / "gguf"
    target = root / f"{path.stem}-{sidecar_key(path)}"
    if (target / GGUF_MARKER).is_file():
        return target
    info = inspect_gguf(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        tmp.chmod(0o755)          # mkdtemp makes it 0700; the cache may be shared read-only
    except OSError as e:
        raise ModelLoadError(f"cannot create the GGUF sidecar cache under {root} ({e}); set "
                             "SLUICE_CACHE_DIR to a writable directory.") from None
    try:
        _write_sidecar(info, tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_sidecar(info: GGUFInfo, out: Path) -> None:
    """config/generation config from `info`, tokenizer files from the child, marker last."""
    from sluice.model_spec.gguf_config import generation_config

    _convert_tokenizer_in_child(info.path, out)
    (out / "config.json").write_text(json.dumps(info.config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(generation_config(info.metadata), indent=2) + "\n")
    (out / GGUF_MARKER).write_text(json.dumps({"gguf_file": str(info.path)}, indent=2) + "\n")


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`; if another process won the race, keep its copy."""
    try:
        os.rename(tmp, target)
    except OSError:
        if (target / GGUF_MARKER).is_file():
            return                   # a racing process finished first; identical content
        shutil.rmtree(target, ignore_errors=True)   # a stale directory without a marker
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not (target / GGUF_MARKER).is_file():
                raise ModelLoadError(f"cannot write the GGUF sidecar {target}: {e}") from None


_CHILD_TIMEOUT_S = 600


def _convert_tokenizer_in_child(gguf_path: Path, out: Path) -> None:
    """Run `python -m sluice.model_spec.gguf tokenizer GGUF OUT` (transformers imports torch,
    which must stay out of this process); its last stderr line becomes the error."""
    cmd = [sys.executable, "-m", "sluice.model_spec.gguf", "tokenizer", str(gguf_path), str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S,
                              env=env)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"{gguf_path}: converting the GGUF tokenizer took longer than "
                             f"{_CHILD_TIMEOUT_S} s.") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ModelLoadError(f"{gguf_path}: could not build a tokenizer from the GGUF "
                             f"metadata: {reason}")


def _tokenizer_main(gguf_path: str, out_dir: str) -> int:
    """Child process: transformers' GGUF tokenizer converter -> tokenizer files in out_dir."""
    import logging

    logging.disable(logging.WARNING)
    try:
        from transformers import PreTrainedTokenizerFast
        path = Path(gguf_path)
        tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      local_files_only=True)
        _register_control_tokens(tok)
        tok.save_pretrained(out_dir)
    except Exception as e:  # any converter failure becomes the parent's one-line error
        print(f"{type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


def _register_control_tokens(tok: Any) -> None:
    """Name the file's control tokens (added tokens marked special, e.g. <|im_start|>) as extra
    special tokens, so `all_special_ids` lists them as in the original tokenizer; the converter
    marks them special in tokenizer.json only. Their ids do not change."""
    import inspect

    named = set(tok.all_special_tokens)
    added = tok.backend_tokenizer.get_added_tokens_decoder()
    extra = [t.content for _, t in sorted(added.items()) if t.special and t.content not in named]
    if not extra:
        return
    params = inspect.signature(tok.add_special_tokens).parameters
    keep = {k: False for k in ("replace_extra_special_tokens",
                               "replace_additional_special_tokens") if k in params}
    before = len(tok)
    tok.add_special_tokens({"additional_special_tokens": extra}, **keep)
    assert len(tok) == before, "registering existing tokens must not grow the vocabulary"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "tokenizer":
        sys.exit(_tokenizer_main(sys.argv[2], sys.argv[3]))
    print("usage: python -m sluice.model_spec.gguf tokenizer GGUF_FILE OUT_DIR", file=sys.stderr)
    sys.exit(2)

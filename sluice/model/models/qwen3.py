"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE (spec.qk_norm), an
explicit head_dim (spec.head_dim may differ from hidden/heads) and no q/k/v bias by default."""

from sluice.model.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass

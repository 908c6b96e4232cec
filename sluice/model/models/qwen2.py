"""Qwen2: the Llama decoder with q/k/v biases (spec.attention_bias) and no o_proj bias."""

from sluice.model.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    o_proj_bias_follows_attention_bias = False

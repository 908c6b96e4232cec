"""Mistral: the Llama decoder without biases. Sliding-window attention is not implemented;
`check_supported` refuses a window shorter than max_model_len (HF's window only changes
outputs for sequences longer than it), so outputs are never silently wrong."""

from sluice.model.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass

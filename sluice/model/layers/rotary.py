"""Rotary position embedding (HF "rotate_half" / neox style), with a precomputed cos/sin cache.

For a head vector x = [x1 | x2] (halves of head_dim D) at position p with angles
a_i = p * inv_freq_i (i < D/2):

    out = [x1*cos(a) - x2*sin(a) | x2*cos(a) + x1*sin(a)]

which is exactly HF's `q*cos + rotate_half(q)*sin` with cos/sin duplicated over both halves.

`inv_freq` follows transformers' `ROPE_INIT_FUNCTIONS` for each rope_type (same float32 ops):
  * default: theta ** -(2i/D)
  * linear:  default / factor
  * llama3:  default with low frequencies divided by `factor` and a smooth blend between
             `low_freq_factor` and `high_freq_factor` (wavelengths measured against
             original_max_position_embeddings)
  * dynamic (NTK): HF recomputes inv_freq from seq_len = max(position_ids)+1 of each forward
    call, with base = theta * (factor*seq_len/max_pos - (factor-1)) ** (D/(D-2)) once
    seq_len > max_position_embeddings (max_pos), and keeps the default frequencies below it.
    We precompute per position: the rotation of the token at position p uses the frequencies
    HF computes for seq_len = max(p+1, max_pos). This matches HF exactly (a) for every sequence
    of at most max_pos tokens (default frequencies throughout) and (b) beyond max_pos for HF's
    token-by-token generation with a KV cache (each new token is rotated with seq_len = p+1 and
    cached keys keep their rotation). It differs from HF's single forward over a prompt longer
    than max_pos, where HF rotates every token with seq_len = prompt length; that is not
    expressible with a KV cache, in HF or here.
All these types have attention_scaling 1.0, so cos/sin are not rescaled.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from sluice.hf_config import RopeSpec
from sluice.model.layers.layer_ops import fast_path_ok


def _base_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta ** exponents)


def _llama3_inv_freq(theta: float, dim: int, scaling: dict, max_pos: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(theta, dim)
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings") or max_pos
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _dynamic_inv_freq(theta: float, dim: int, factor: float, max_pos: int,
                      num_positions: int) -> torch.Tensor:
    """[num_positions, D/2]: row p holds HF's dynamic-NTK inv_freq for seq_len = max(p+1, max_pos).

    Rows p+1 <= max_pos use HF's init-time computation (Python floats, seq_len = max_pos); rows
    beyond use its forward-time recomputation (float32 tensor ops on seq_len = p+1), op for op.
    """
    init_base = theta * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv = _base_inv_freq(init_base, dim)[None, :].repeat(num_positions, 1)
    if num_positions > max_pos:
        seq_len = torch.arange(max_pos + 1, num_positions + 1, dtype=torch.int64)
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv[max_pos:] = 1.0 / (base[:, None] ** exponents[None, :])
    return inv


def compute_inv_freq(rope: RopeSpec, head_dim: int, max_position_embeddings: int
                     ) -> torch.Tensor:
    """The position-independent inv_freq [D/2] (float32) for default/linear/llama3, and the
    default frequencies for dynamic (its per-position rows come from the cache builder)."""
    theta = rope.theta
    if rope.rope_type in ("default", "dynamic"):
        return _base_inv_freq(theta, head_dim)
    if rope.rope_type == "linear":
        return _base_inv_freq(theta, head_dim) / rope.scaling["factor"]
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(theta, head_dim, rope.scaling, max_position_embeddings)
    raise ValueError(f"rope_type '{rope.rope_type}' is not supported")


def default_cache_len(rope: RopeSpec, max_position_embeddings: int,
                      max_model_len: int | None = None) -> int:
    """Positions to precompute: max_model_len if given, else max_position_embeddings
    (times `factor` for linear/dynamic, whose point is to run past it)."""
    if max_model_len is not None:
        return max_model_len
    if rope.rope_type in ("linear", "dynamic"):
        return int(max_position_embeddings * rope.scaling.get("factor", 1.0))
    return max_position_embeddings


class RotaryEmbedding(nn.Module):
    """cos/sin cache [max_position, D/2] (float32 buffers, not saved in state dicts).

    Usage per step: `cos, sin = rope.cos_sin(positions, dtype)` once ([T, 1, D/2] each), then
    `rope.apply(x, cos, sin)` for any x [T, heads, D].
    """

    def __init__(self, head_dim: int, max_position: int, rope: RopeSpec,
                 max_position_embeddings: int) -> None:
        super().__init__()
        assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
        self.head_dim = head_dim
        self.max_position = max_position
        self.rope_type = rope.rope_type
        with torch.device("cpu"):
            if rope.rope_type == "dynamic":
                inv = _dynamic_inv_freq(rope.theta, head_dim, rope.scaling["factor"],
                                        max_position_embeddings, max_position)
            else:
                inv = compute_inv_freq(rope, head_dim, max_position_embeddings)[None, :]
            pos = torch.arange(max_position, dtype=torch.int64).float()[:, None]
            freqs = pos * inv
            cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos_cache", cos.to(torch.get_default_device()), persistent=False)
        self.register_buffer("sin_cache", sin.to(torch.get_default_device()), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] long (each < max_position) -> (cos, sin), each [T, 1, D/2] in `dtype`."""
        cos = self.cos_cache.index_select(0, positions)
        sin = self.sin_cache.index_select(0, positions)
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              cpu_ops: ModuleType | None = None) -> torch.Tensor:
        """x [T, heads, D] (any strides) -> rotated copy [T, heads, D], contiguous; one fused
        C++ pass when `cpu_ops` is given and the tensors are float32 CPU."""
        if cpu_ops is not None and fast_path_ok(x, cos, sin) and cos.is_contiguous() \
                and sin.is_contiguous():
            out = torch.empty(x.shape, dtype=x.dtype)
            cpu_ops.rotary(out, x, cos, sin)
            return out
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convenience: rotate q [T, H, D] and k [T, Hkv, D] at `positions` [T]."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}, type={self.rope_type}"

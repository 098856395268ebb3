"""The DGF draft: Dynamic Gating Fusion → N LLaMA decoder layers → the target's LM head.

Shapes: B batch, T new tokens, S cache length, H hidden, V target vocab, K head vocab.
Input at draft position t is (f_t, token_{t+1}): f_t the target's post-norm feature of token
t (or, while drafting, the draft's own output), and the target's embedding of token t+1.
The output h_{t+1} regresses f_{t+1}; head(h_{t+1}) scores token t+2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from draft_model.config import DraftConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·rsqrt(mean(x²) + eps) in float32, back in x's dtype, times the weight — in one
        operation (one kernel where PyTorch fuses it, not six: a draft level on a GPU is
        mostly launch latency)."""
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class DynamicGatingFusion(nn.Module):
    """x = z·(f W1) + (1−z)·SiLU(RMSNorm(e) W2), z = σ([f W1, SiLU(RMSNorm(e) W2)] Wz)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.embed_norm = RMSNorm(hidden, eps)
        self.w1 = nn.Linear(hidden, hidden, bias=False)
        self.w2 = nn.Linear(hidden, hidden, bias=False)
        self.wz = nn.Linear(2 * hidden, hidden, bias=False)
        for layer in (self.w1, self.w2, self.wz):
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, feature: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h1 = self.w1(feature)  # [B, T, H]
        h2 = F.silu(self.w2(self.embed_norm(embedding)))  # [B, T, H]
        gate = torch.sigmoid(self.wz(torch.cat((h1, h2), dim=-1)))  # [B, T, H]: per dimension
        return gate * h1 + (1 - gate) * h2


class ConcatFusion(nn.Module):
    """EAGLE's input: x = fc(concat(e, f)) with a bias (kept for the ablation)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)

    def forward(self, feature: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat((embedding, feature), dim=-1))


def rope_tables(config: DraftConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for rotate-half RoPE at the given positions: [..., head_dim] each;
    the sin's first half is negated, so that `apply_rope` needs no negation per call."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=positions.device,
                                                         dtype=torch.float32) / dim))
    angles = positions.float()[..., None] * inv_freq  # [..., dim/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x·cos + (−x₂, x₁)·sin, computed as x·cos + (x₂, x₁)·(−sin, sin) —
    the same products, in fewer operations (a draft level on a GPU is launch latency)."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)


@dataclass
class KVCache:
    """Preallocated keys and values of one sequence: [layers, kv_heads, capacity, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def allocate(cls, config: DraftConfig, capacity: int, device: torch.device,
                 dtype: torch.dtype) -> KVCache:
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


class Attention(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                slots: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Without a cache: causal attention over x. With one (batch 1): write this call's
        keys/values at `slots` [T] and attend to the cache under `mask` [T, S] (True = see)."""
        batch, length, _ = x.shape
        config = self.config
        q = self.q_proj(x).view(batch, length, config.num_heads, config.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, config.num_kv_heads, config.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, config.num_kv_heads, config.head_dim).transpose(1, 2)
        # queries and keys rotated in one go: [B, heads + kv_heads, T, D]
        rotated = apply_rope(torch.cat((q, k), dim=1), cos, sin)
        q, k = rotated[:, :config.num_heads], rotated[:, config.num_heads:]
        groups = config.num_heads // config.num_kv_heads
        if cache is None:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            layer_keys, layer_values = cache  # [kv_heads, capacity, D]
            layer_keys[:, slots] = k[0]
            layer_values[:, slots] = v[0]
            seen = mask.shape[-1]
            k = layer_keys[None, :, :seen].repeat_interleave(groups, dim=1)
            v = layer_values[None, :, :seen].repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DraftConfig, has_input_norm: bool) -> None:
        super().__init__()
        # Layer 0 reads the DGF output directly (no input norm), as in the reference.
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if has_input_norm \
            else nn.Identity()
        self.attention = Attention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, slots=None, mask=None) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), cos, sin, cache, slots, mask)
        return x + self.mlp(self.post_attention_norm(x))


class DraftModel(nn.Module):
    """Trainable: DGF and the layers. Frozen buffers: the target's embedding and LM head."""

    def __init__(self, config: DraftConfig, embedding: torch.Tensor, lm_head: torch.Tensor,
                 head_token_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        if embedding.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"embedding has shape {tuple(embedding.shape)}, config wants "
                             f"({config.vocab_size}, {config.hidden_size})")
        if config.draft_vocab_size:
            if head_token_ids is None or head_token_ids.shape != (config.draft_vocab_size,):
                raise ValueError("a reduced draft vocabulary needs its target token ids")
            lm_head = lm_head[head_token_ids]
        else:
            head_token_ids = torch.arange(config.vocab_size)
        self.register_buffer("embedding", embedding.detach().clone(), persistent=False)
        self.register_buffer("lm_head", lm_head.detach().clone(), persistent=False)  # [K, H]
        # head index → target token id (the identity for a full head); saved with the weights
        self.register_buffer("head_token_ids", head_token_ids.long().clone())
        self.fusion = DynamicGatingFusion(config.hidden_size, config.rms_norm_eps) \
            if config.fusion == "dgf" else ConcatFusion(config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, has_input_norm=i > 0)
                                    for i in range(config.num_layers))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, slots: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, T, H], tokens [B, T] (the *next* tokens), positions [B, T]
        → draft features [B, T, H]. With a cache, B = 1 and see `Attention.forward`."""
        x = self.fusion(features.to(self.embedding.dtype), self.embedding[tokens])
        cos, sin = rope_tables(self.config, positions)  # [B, T, D]
        cos, sin = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)  # [B, 1, T, D]
        for index, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
            x = layer(x, cos, sin, layer_cache, slots, mask)
        return x

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] → [..., K] scores over the head vocabulary (see `head_token_ids`)."""
        return hidden @ self.lm_head.T

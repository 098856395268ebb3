"""The target's forward pass in PyTorch, built from its GGUF (llama architecture).

For making training data fast: on a GPU this computes the target's features and greedy
answers for thousands of sequences at once, where llama.cpp on a CPU manages ~200 tokens/s.
The weights are the GGUF's own, dequantized; only the arithmetic differs from llama.cpp
(which quantizes activations for its Q4/Q8 dot products), so features agree closely but not
bit for bit — fine for training data, never used for serving.

llama.cpp stores Q and K of llama models permuted for its "normal" RoPE, which rotates
adjacent pairs (2i, 2i+1); this port rotates the same pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from draft_model.config import TargetInfo
from draft_model.target_weights import dequantized, read_target_info

_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                  "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    attn_q: torch.Tensor  # [out, in]
    attn_k: torch.Tensor
    attn_v: torch.Tensor
    attn_output: torch.Tensor
    ffn_norm: torch.Tensor
    ffn_gate: torch.Tensor
    ffn_up: torch.Tensor
    ffn_down: torch.Tensor


class TorchTarget:
    """Features [B, T, H] (post final norm) and logits of a llama-architecture GGUF."""

    def __init__(self, info: TargetInfo, embedding: torch.Tensor, output_norm: torch.Tensor,
                 lm_head: torch.Tensor, layers: list[LayerWeights]) -> None:
        if info.architecture != "llama":
            raise ValueError(f"the PyTorch target supports llama models, not {info.architecture}")
        self.info = info
        self.embedding = embedding
        self.output_norm = output_norm
        self.lm_head = lm_head
        self.layers = layers
        self.head_dim = info.hidden_size // info.num_heads

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> TorchTarget:
        reader = gguf.GGUFReader(path)
        info = read_target_info(reader)
        tensors = {tensor.name: tensor for tensor in reader.tensors}

        def weight(name: str, keep_fp32: bool = False) -> torch.Tensor:
            values = torch.from_numpy(np.array(dequantized(tensors[name])))
            return values.to(device, torch.float32 if keep_fp32 else dtype)

        num_layers = sum(1 for name in tensors if name.endswith(".attn_q.weight"))
        layers = [LayerWeights(**{part: weight(f"blk.{i}.{part}.weight",
                                               keep_fp32=part.endswith("norm"))
                                  for part in _LAYER_TENSORS}) for i in range(num_layers)]
        embedding = weight("token_embd.weight")
        head = weight("output.weight") if "output.weight" in tensors else embedding
        return cls(info, embedding, weight("output_norm.weight", keep_fp32=True), head, layers)

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.info.rms_norm_eps)
        return (x32 * weight).to(x.dtype)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, D]; rotate adjacent pairs by position · θ^(−2i/D)."""
        dim = self.head_dim
        inv_freq = self.info.rope_theta ** (-torch.arange(0, dim, 2, device=x.device,
                                                          dtype=torch.float32) / dim)
        angles = positions.float()[:, None, :, None] * inv_freq  # [B, 1, T, D/2]
        cos, sin = angles.cos(), angles.sin()
        pairs = x.float().unflatten(-1, (dim // 2, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                cache_length: int = 0) -> torch.Tensor:
        """tokens [B, T] → features [B, T, H].

        Without a cache: causal attention within the T tokens (right padding is harmless).
        With one (a list of per-layer [B, kv_heads, capacity, D] key/value buffers): this
        call's keys are written at cache_length.. and attention_mask [B, T, cache_length+T]
        (True = may attend) says what each new token sees.
        """
        batch, length = tokens.shape
        info = self.info
        if positions is None:
            positions = torch.arange(length, device=tokens.device).expand(batch, -1)
        x = self.embedding[tokens]
        groups = info.num_heads // info.num_kv_heads
        end = cache_length + length
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.attn_norm)
            q = (h @ layer.attn_q.T).view(batch, length, info.num_heads, -1).transpose(1, 2)
            k = (h @ layer.attn_k.T).view(batch, length, info.num_kv_heads, -1).transpose(1, 2)
            v = (h @ layer.attn_v.T).view(batch, length, info.num_kv_heads, -1).transpose(1, 2)
            q, k = self._rope(q, positions), self._rope(k, positions)
            if cache is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                keys, values = cache[index]
                keys[:, :, cache_length:end] = k
                values[:, :, cache_length:end] = v
                out = _grouped_attention(q, keys[:, :, :end], values[:, :, :end],
                                         attention_mask, groups)
            x = x + out.transpose(1, 2).reshape(batch, length, -1) @ layer.attn_output.T
            h = self._norm(x, layer.ffn_norm)
            x = x + (F.silu(h @ layer.ffn_gate.T) * (h @ layer.ffn_up.T)) @ layer.ffn_down.T
        return self._norm(x, self.output_norm)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.lm_head.T

    def allocate_cache(self, batch: int, capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.info.num_kv_heads, capacity, self.head_dim)
        return [(torch.zeros(shape, device=self.device, dtype=self.embedding.dtype),
                 torch.zeros(shape, device=self.device, dtype=self.embedding.dtype))
                for _ in self.layers]

    @torch.inference_mode()
    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int,
                        stop_tokens: set[int]) -> list[list[int]]:
        """Greedy answers for a batch of prompts (left-padded together); each answer ends
        at its first stop token (included) or after max_new_tokens."""
        batch = len(prompts)
        longest = max(len(prompt) for prompt in prompts)
        device = self.device
        tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)
        valid = torch.zeros(batch, longest + max_new_tokens, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
            valid[row, longest - len(prompt):longest] = True
        positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        mask = causal[None] & valid[:, None, :longest]
        # a pad row that sees nothing would give NaN: let it see itself
        mask |= torch.eye(longest, dtype=torch.bool, device=device)[None]
        cache = self.allocate_cache(batch, longest + max_new_tokens)
        features = self.forward(tokens, positions, mask, cache, 0)[:, -1:]
        next_positions = positions[:, -1:] + 1
        stop = torch.tensor(sorted(stop_tokens), device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        answers = []
        length = longest
        for _ in range(max_new_tokens):
            chosen = self.logits(features[:, -1]).argmax(-1)  # [B]
            answers.append(torch.where(done, -1, chosen))
            done |= torch.isin(chosen, stop)
            if bool(done.all()) or len(answers) == max_new_tokens:
                break
            valid[:, length] = True
            step_mask = valid[:, None, :length + 1]
            features = self.forward(chosen[:, None], next_positions, step_mask, cache, length)
            next_positions = next_positions + 1
            length += 1
        table = torch.stack(answers, dim=1).cpu().tolist()
        return [[token for token in row if token >= 0] for row in table]


class TorchFeatureSource:
    """The same interface as llama_features.LlamaFeatureSource, batched on any device."""

    def __init__(self, target: TorchTarget, batch_tokens: int = 65536) -> None:
        self.target = target
        self.batch_tokens = batch_tokens

    def features(self, sequences: list[list[int]]) -> list[np.ndarray]:
        results: list[np.ndarray] = []
        for group in _groups(sequences, self.batch_tokens):
            width = max(len(s) for s in group)
            tokens = torch.zeros(len(group), width, dtype=torch.long)
            for row, sequence in enumerate(group):
                tokens[row, :len(sequence)] = torch.tensor(sequence)
            features = self.target.forward(tokens.to(self.target.device)).float().cpu().numpy()
            results.extend(features[row, :len(s)] for row, s in enumerate(group))
        return results

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_tokens: set[int],
                 max_seconds: float | None = None) -> list[list[int] | None]:
        """Greedy answers only, in batches of similar-length prompts. With max_seconds, the
        batches run in a seeded random order (so prompts of every length get answers) and
        none starts after that time; the prompts left unanswered come back as None."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        groups, start = [], 0
        for group in _groups([prompts[i] for i in order], self.batch_tokens, max_new_tokens):
            groups.append(order[start:start + len(group)])
            start += len(group)
        if max_seconds is not None:
            np.random.default_rng(0).shuffle(groups)
        by_prompt: list[list[int] | None] = [None] * len(prompts)
        started = perf_counter()
        for group in tqdm(groups, desc="generate", unit="batch", dynamic_ncols=True):
            if max_seconds is not None and perf_counter() - started > max_seconds:
                break
            answers = self.target.generate_greedy([prompts[i] for i in group], max_new_tokens,
                                                  stop_tokens)
            for index, answer in zip(group, answers, strict=True):
                by_prompt[index] = answer
        return by_prompt

    def answer(self, prompts: list[list[int]], max_new_tokens: int,
               stop_tokens: set[int]) -> list[tuple[list[int], np.ndarray]]:
        answers = self.generate(prompts, max_new_tokens, stop_tokens)
        features = self.features([p + a for p, a in zip(prompts, answers, strict=True)])
        return list(zip(answers, features, strict=True))


def _grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       mask: torch.Tensor, groups: int) -> torch.Tensor:
    """Attention of q [B, heads, T, D] over a cache [B, kv_heads, S, D] under mask
    [B, T, S], each KV head serving its group of query heads as G·T rows. The same
    arithmetic as SDPA's enable_gqa, but with a mask enable_gqa runs on the math backend,
    which copies the cache once per group; this stays on the fused kernels."""
    batch, heads, length, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, groups * length, dim)  # row g·T + t: head k·G + g
    rows_mask = mask.repeat(1, groups, 1)[:, None]  # [B, 1, G·T, S]
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=rows_mask)
    return out.reshape(batch, heads, length, dim)


def _groups(sequences: list[list[int]], batch_tokens: int, extra: int = 0):
    """Consecutive groups whose padded size (rows × (longest + extra)) fits batch_tokens."""
    group: list[list[int]] = []
    longest = 0
    for sequence in sequences:
        width = max(longest, len(sequence)) + extra
        if group and (len(group) + 1) * width > batch_tokens:
            yield group
            group, longest = [], 0
        group.append(sequence)
        longest = max(longest, len(sequence))
    if group:
        yield group

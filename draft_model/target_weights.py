"""What the draft borrows from the target's GGUF: facts, token embeddings and LM head.

Read with the `gguf` package (dequantized to float32); the draft never imports the verifier.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from draft_model.config import TargetInfo


@dataclass(frozen=True)
class TargetWeights:
    info: TargetInfo
    embedding: np.ndarray  # [vocab, hidden] float32
    lm_head: np.ndarray  # [vocab, hidden] float32 (the embedding itself when tied)


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"GGUF has no '{key}'")
    return field.contents()


def dequantized(tensor) -> np.ndarray:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


def read_target_info(reader: gguf.GGUFReader) -> TargetInfo:
    arch = _field(reader, "general.architecture")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    digest = hashlib.sha256()
    for index in tokens.data:  # indices of the string payloads among the field's parts
        digest.update(tokens.parts[index].tobytes())
        digest.update(b"\0")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden, vocab = (int(n) for n in embedding.shape[:2])
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_field = reader.get_field(f"{arch}.attention.head_count_kv")
    rope_field = reader.get_field(f"{arch}.rope.freq_base")
    return TargetInfo(
        architecture=arch,
        hidden_size=hidden,
        vocab_size=vocab,
        tokenizer_fingerprint=digest.hexdigest(),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        num_heads=num_heads,
        num_kv_heads=int(kv_field.contents()) if kv_field is not None else num_heads,
        rope_theta=float(rope_field.contents()) if rope_field is not None else 10000.0,
    )


def read_target_weights(path: Path | str) -> TargetWeights:
    reader = gguf.GGUFReader(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embedding = dequantized(tensors["token_embd.weight"])
    head = dequantized(tensors["output.weight"]) if "output.weight" in tensors else embedding
    return TargetWeights(info=read_target_info(reader), embedding=embedding, lm_head=head)

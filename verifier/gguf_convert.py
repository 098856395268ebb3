"""Write GGUFs with the `gguf` package: an unquantized (F16) copy of a model, or a
LLaMA-shaped model with meaningless weights for timing.

Quantized targets round differently in batched and one-token evaluation (see
docs/how-it-works.md), so exactness tests compare against an F16 copy, for which both agree.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

_FILE_TYPE_KEY = "general.file_type"
_ARCH_KEY = "general.architecture"


def write_f16_copy(source: Path, destination: Path) -> Path:
    """Dequantize every tensor of `source`: matrices to F16, vectors (norms) to F32."""
    return write_unquantized_copy(source, destination, np.float16)


@contextlib.contextmanager
def temporary_f16_copy(source: Path) -> Iterator[Path]:
    """An F16 copy of `source` in a temporary folder, removed afterwards (the scripts'
    `--f16`)."""
    with tempfile.TemporaryDirectory() as folder:
        yield write_f16_copy(source, Path(folder) / (source.stem + "-f16.gguf"))


def write_f32_copy(source: Path, destination: Path) -> Path:
    """Dequantize every tensor of `source` to F32."""
    return write_unquantized_copy(source, destination, np.float32)


def write_unquantized_copy(source: Path, destination: Path, matrix_dtype: type) -> Path:
    reader = gguf.GGUFReader(source)
    architecture = reader.get_field(_ARCH_KEY).contents()
    writer = gguf.GGUFWriter(destination, arch=architecture)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (_ARCH_KEY, _FILE_TYPE_KEY):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if matrix_dtype == np.float16
                         else gguf.LlamaFileType.ALL_F32)

    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        if values.ndim >= 2:
            writer.add_tensor(tensor.name, values.astype(matrix_dtype))
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination


LLAMA2_7B = {"vocab": 32000, "hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32,
             "ffn": 11008}


def write_random_llama(destination: Path, vocab: int, hidden: int, layers: int, heads: int,
                       kv_heads: int, ffn: int, context: int = 4096) -> Path:
    """A LLaMA-architecture GGUF of this shape with meaningless Q4_0 weights — for timing
    only (llama.cpp's speed does not depend on the values). Every block of a tensor is the
    same random block with a small scale, so the file is written without random gigabytes."""
    writer = gguf.GGUFWriter(destination, arch="llama")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256 + \
        [gguf.TokenType.NORMAL] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, size=18, dtype=np.uint8)
    block[:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # the block scale

    def q4_0(rows: int, cols: int) -> np.ndarray:
        row = np.tile(block, cols // 32)
        return np.broadcast_to(row, (rows, row.size))

    def add_matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, q4_0(rows, cols), raw_dtype=gguf.GGMLQuantizationType.Q4_0)

    add_matrix("token_embd.weight", vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    add_matrix("output.weight", vocab, hidden)
    head_dim = hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        add_matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        add_matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add_matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add_matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        add_matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add_matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add_matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination

"""Write an unquantized (F16) copy of a GGUF with the `gguf` package.

Quantized targets round differently in batched and one-token evaluation (see
docs/llama-cpp.md), so exactness tests compare against an F16 copy, for which both agree.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

_FILE_TYPE_KEY = "general.file_type"
_ARCH_KEY = "general.architecture"


def write_f16_copy(source: Path, destination: Path) -> Path:
    """Dequantize every tensor of `source`: matrices to F16, vectors (norms) to F32."""
    return write_unquantized_copy(source, destination, np.float16)


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

# Dovetail: the README's install steps, line for line, on a CUDA runtime base
# (the draft model will use the GPU; the target runs on the CPU through llama.cpp).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dovetail
COPY . .

# README "Plain steps": python -m venv .venv, then pip install with CMAKE_ARGS.
# llama-cpp-python compiles llama.cpp for the CPU here (several minutes), without its
# llamafile kernels: batched and one-token logits are then identical (docs/how-it-works.md).
RUN python3 -m venv .venv \
 && CMAKE_ARGS="-DGGML_LLAMAFILE=OFF" .venv/bin/pip install --no-cache-dir -e ".[dev]"

ENV PATH=/opt/dovetail/.venv/bin:$PATH
EXPOSE 8000
CMD ["dovetail", "serve", "--host", "0.0.0.0"]

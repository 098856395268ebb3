"""The one settings object at the edge: CLI flags and DOVETAIL_* environment variables.

Every field becomes a `--flag` (underscores as dashes) and an env var `DOVETAIL_<FIELD>`;
a flag given on the command line wins over the environment, which wins over the default.
Nothing below `server/` reads argv or the environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from verifier.default_model import default_model_path
from verifier.machine import physical_cores

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: every tree branch of every slot is one


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DOVETAIL_", frozen=True, extra="ignore")

    model: Path | None = Field(
        None, description="Target GGUF file (default: the packaged SmolLM2-135M-Instruct Q4_1)."
    )
    model_name: str | None = Field(
        None, description="Model id reported by /v1/models (default: the GGUF file's stem)."
    )
    draft: str = Field(
        "auto", description="Draft checkpoint folder; 'shipped' (the draft trained for the "
        "default model); 'ngram' (prompt lookup in the request's own context); 'auto' (the "
        "shipped one when a GPU is present and the target is the model it was trained for "
        "— the default model under any path, or its F16 copy — else 'ngram'); "
        "or 'none' for plain decoding.")
    adaptive_budget: bool = Field(
        True, description="Per step, verify only what the measured costs and running "
        "acceptance say pays: the draft's tree cut to the best size, the lookup chain alone, "
        "or nothing (plain decoding); off: always the full proposal of --draft-tokens.")
    draft_lookup: bool = Field(
        True, description="With a draft model: merge prompt lookup's continuation (from the "
        "request's own context) into the draft's tree.")
    draft_choice: bool = Field(
        True, description="With a draft model (and the adaptive budget): per request, the "
        "draft or prompt lookup alone (no features, no draft), whichever has lately served "
        "requests faster (the other every 8th request, every 32nd while it is over 1.5× "
        "slower); off: every request with the draft.")
    draft_ahead: bool = Field(
        True, description="With a draft model: grow the next tree, below the outcome the "
        "draft finds likeliest, while the target verifies this one (used when the guess comes "
        "true); the adaptive budget keeps it only while steps gain from it (a draft on the "
        "target's CPU competes for its cores). Off: draft and verify in turn.")
    lookup_shared: bool = Field(
        True, description="Prompt lookup also searches the texts (prompt and output) of "
        "earlier requests to this server, the last 65,536 tokens of them, kept in memory; "
        "off: each request's own context only.")
    exact: bool = Field(
        True, description="Speculative output bit-identical to plain decoding, under "
        "concurrency too: the target verifies one chain per step (the likeliest path of the "
        "draft's tree), each request in KV cells of its own. Off: whole trees in one shared "
        "cache, more tokens accepted per step, output equal only up to rounding. Needs "
        "llama.cpp without llamafile kernels (the default install).")
    draft_top_k: int = Field(4, ge=1, le=32, description="Children per expanded draft node.")
    draft_depth: int = Field(5, ge=1, le=32, description="Levels of the draft tree below the root.")
    draft_tokens: int = Field(
        8, ge=1, le=64, description="Tokens verified per step, root included (1: no drafting)."
    )
    draft_device: str = Field("auto", description="Draft device: auto (CUDA if any), cpu, cuda:N.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    api_key: str | None = Field(
        None, description="If set, /v1/* requires 'Authorization: Bearer <key>'."
    )
    threads: int = Field(
        0, ge=0, description="CPU threads for the target (0: one per physical core)."
    )
    ctx_size: int = Field(
        4096, ge=64, description="Context length per request: prompt + completion tokens."
    )
    batch_size: int = Field(512, ge=1, description="Tokens per llama.cpp decode during prefill.")
    extra_buffers: Literal["auto", "on", "off"] = Field(
        "auto", description="llama.cpp's extra weight buffer types (AMX tiles, repacked "
        "layouts); auto: off where the llama.cpp build uses AMX, whose matrix kernel "
        "can crash the first decode (llama.cpp issue 20824).")
    flash_attn: bool = Field(
        False, description="llama.cpp flash attention (off: greedy text equals llama-cpp-python's)."
    )
    max_concurrency: int = Field(
        4, ge=1, le=64, description="Requests decoded at the same time (one KV slot each)."
    )
    max_queue: int = Field(
        64, ge=0, description="Requests that may wait for a slot; beyond it: 429 + Retry-After."
    )
    prefix_reuse: bool = Field(
        True, description="Keep a finished request's KV cells (and its draft state's) and "
        "skip the prompt prefix a new request shares with them.")
    request_timeout: float = Field(
        600, ge=0, description="Seconds a request may take from arrival (0: no limit); one "
        "still waiting for a slot then gets 503, one generating ends with what it has.")
    shutdown_grace: float = Field(
        30, ge=0, description="On SIGINT/SIGTERM: seconds running requests may go on before "
        "they are ended (waiting ones get 503 at once).")

    @field_validator("draft")
    @classmethod
    def _draft_exists(cls, value: str) -> str:
        named = ("none", "auto", "shipped", "ngram")
        if value not in named and not (Path(value) / "config.json").is_file():
            raise ValueError(f"'{value}' is not a draft checkpoint folder (no config.json); "
                             "use 'auto', 'shipped', 'ngram' or 'none'")
        return value

    @model_validator(mode="after")
    def _fits_llama_cpp(self) -> Settings:
        if self.max_concurrency * self.draft_tokens > MAX_SEQUENCES:
            raise ValueError(f"max_concurrency × draft_tokens must be ≤ {MAX_SEQUENCES} "
                             "(llama.cpp's sequence limit)")
        return self

    @property
    def model_path(self) -> Path:
        return self.model if self.model is not None else default_model_path()

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model_path.stem

    @property
    def num_threads(self) -> int:
        return self.threads or physical_cores()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; default None so unset flags fall through to env/defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "DOVETAIL_" + name.upper()
        default = "packaged model" if name == "model" else field.default
        help_text = f"{field.description} [env {env}; default {default}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, default=None, help=help_text,
                                action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text,
                                metavar=name.split("_")[-1].upper())


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**{name: value for name, value in given.items() if value is not None})

"""The one settings object at the edge: CLI flags and DOVETAIL_* environment variables.

Every field becomes a `--flag` (underscores as dashes) and an env var `DOVETAIL_<FIELD>`;
a flag given on the command line wins over the environment, which wins over the default.
Nothing below `server/` reads argv or the environment.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from verifier.default_model import default_model_path


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DOVETAIL_", frozen=True, extra="ignore")

    model: Optional[Path] = Field(
        None, description="Target GGUF file (default: the packaged SmolLM2-135M-Instruct Q4_1)."
    )
    model_name: Optional[str] = Field(
        None, description="Model id reported by /v1/models (default: the GGUF file's stem)."
    )
    draft: str = Field("none", description="Draft checkpoint, or 'none' for plain decoding.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    api_key: Optional[str] = Field(
        None, description="If set, /v1/* requires 'Authorization: Bearer <key>'."
    )
    threads: int = Field(
        0, ge=0, description="CPU threads for the target (0: all cores of this machine)."
    )
    ctx_size: int = Field(
        4096, ge=64, description="Context length per request: prompt + completion tokens."
    )
    batch_size: int = Field(512, ge=1, description="Tokens per llama.cpp decode during prefill.")
    max_concurrency: int = Field(
        4, ge=1, le=64, description="Requests decoded at the same time (one KV slot each)."
    )

    @field_validator("draft")
    @classmethod
    def _draft_known(cls, value: str) -> str:
        if value != "none":
            raise ValueError("only --draft none (plain decoding) is available in this version")
        return value

    @property
    def model_path(self) -> Path:
        return self.model if self.model is not None else default_model_path()

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model_path.stem

    @property
    def num_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; default None so unset flags fall through to env/defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "DOVETAIL_" + name.upper()
        default = "packaged model" if name == "model" else field.default
        parser.add_argument(
            flag, dest=name, default=None, help=f"{field.description} [env {env}; default {default}]"
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**{name: value for name, value in given.items() if value is not None})

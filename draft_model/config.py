"""What a draft is: its shape, and the target it was trained for."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class TargetInfo:
    """The facts of a target model a draft depends on; a checkpoint records them."""

    architecture: str
    hidden_size: int
    vocab_size: int
    tokenizer_fingerprint: str  # sha256 over the GGUF's token strings
    rms_norm_eps: float
    num_heads: int
    num_kv_heads: int
    rope_theta: float

    def differences(self, other: TargetInfo) -> list[str]:
        """Human-readable list of what differs (empty when the targets match).

        Only what the draft's weights depend on counts: architecture, sizes, tokenizer.
        """
        checked = ("architecture", "hidden_size", "vocab_size", "tokenizer_fingerprint")
        return [f"{name}: checkpoint has {getattr(self, name)!r}, target has "
                f"{getattr(other, name)!r}"
                for name in checked if getattr(self, name) != getattr(other, name)]


@dataclass(frozen=True)
class DraftConfig:
    hidden_size: int  # = the target's hidden size (the draft reads its features)
    vocab_size: int  # the target's vocabulary
    num_layers: int = 2  # LLaMA decoder layers after DGF
    num_heads: int = 9
    num_kv_heads: int = 3  # grouped-query attention when < num_heads
    intermediate_size: int = 1536
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_positions: int = 8192
    draft_vocab_size: int = 0  # 0: the head scores the full target vocabulary
    fusion: str = "dgf"  # "dgf" (Dovetail) or "concat" (EAGLE's fc(concat(e, f)), ablation)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError("draft_vocab_size must be in 0..vocab_size")
        if self.fusion not in ("dgf", "concat"):
            raise ValueError(f"fusion must be 'dgf' or 'concat', not {self.fusion!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DraftConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown draft config fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def for_target(cls, target: TargetInfo, **overrides) -> DraftConfig:
        """A draft shaped like the target's layers (heads, rope, eps), N layers deep."""
        base = dict(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                    num_heads=target.num_heads, num_kv_heads=target.num_kv_heads,
                    intermediate_size=target.hidden_size * 8 // 3 // 64 * 64 or 64,
                    rope_theta=target.rope_theta, rms_norm_eps=target.rms_norm_eps)
        base.update(overrides)
        return cls(**base)

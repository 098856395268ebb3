"""The training loop: batches in, checkpoints and a log out; resumable and seeded.

Batches come either from stored feature shards or from token sets whose features the
PyTorch target computes on the fly (on a GPU that is far cheaper than storing them).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from draft_model.model import DraftModel
from draft_model.training.features import FeatureShard
from draft_model.training.sequences import SequenceSet, padded_batches
from draft_model.training.train import Batch, TrainConfig, draft_loss, make_optimizer

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


def shard_batches(shard: FeatureShard, batch_tokens: int, max_length: int, device,
                  seed: int) -> Iterator[Batch]:
    """Endless shuffled epochs over stored features."""
    rng = np.random.default_rng(seed)
    offsets = shard.sequences.offsets
    while True:
        for group, tokens, mask in padded_batches(shard.sequences, batch_tokens, max_length, rng):
            features = np.zeros((*tokens.shape, shard.features.shape[1]), np.float16)
            for row, index in enumerate(group):
                count = min(int(offsets[index + 1] - offsets[index]), tokens.shape[1])
                features[row, :count] = shard.features[offsets[index]:offsets[index] + count]
            yield Batch(torch.from_numpy(features).to(device), torch.from_numpy(tokens).to(device),
                        torch.from_numpy(mask).to(device))


def online_batches(sequences: SequenceSet, feature_fn: Callable[[torch.Tensor], torch.Tensor],
                   batch_tokens: int, max_length: int, device, seed: int) -> Iterator[Batch]:
    """Endless shuffled epochs over token sets; feature_fn: tokens [B, T] → features."""
    rng = np.random.default_rng(seed)
    while True:
        for _, tokens, mask in padded_batches(sequences, batch_tokens, max_length, rng):
            token_tensor = torch.from_numpy(tokens).to(device)
            yield Batch(feature_fn(token_tensor), token_tensor, torch.from_numpy(mask).to(device))


@dataclass
class RunLimits:
    max_steps: int = 0  # 0: no limit
    max_tokens: int = 0  # trained (masked) tokens seen
    max_seconds: float = 0.0
    eval_every: int = 0  # steps; 0: only at the end
    eval_every_seconds: float = 0.0  # training seconds between evaluations (0: by steps)
    checkpoint_every: int = 0  # steps; 0: only at the end


class Trainer:
    """Owns model, optimiser and counters; `run` trains until a limit and can resume."""

    def __init__(self, model: DraftModel, config: TrainConfig, out_dir: Path, seed: int = 0,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.config = config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        torch.manual_seed(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.optimizer, _ = make_optimizer(model, config)
        self.step = 0
        self.tokens_seen = 0
        self.seconds = 0.0

    def resume(self) -> bool:
        """Load model, optimiser and counters from out_dir if a state is there."""
        path = self.out_dir / STATE_FILE
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu() if self.device.type == "cpu"
                                 else state["generator"])
        self.step, self.tokens_seen, self.seconds = (state["step"], state["tokens_seen"],
                                                     state["seconds"])
        return True

    def save_state(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(), "step": self.step,
                 "tokens_seen": self.tokens_seen, "seconds": self.seconds}
        temporary = self.out_dir / (STATE_FILE + ".tmp")
        torch.save(state, temporary)
        temporary.replace(self.out_dir / STATE_FILE)

    def _eval_due(self, limits: RunLimits) -> bool:
        if limits.eval_every_seconds:
            due = self.seconds >= self._next_eval_seconds
            if due:
                self._next_eval_seconds = self.seconds + limits.eval_every_seconds
            return due
        return bool(limits.eval_every) and self.step % limits.eval_every == 0

    def learning_rate(self, fraction: float) -> float:
        """Linear warmup over warmup_steps, then cosine decay to 10% at the end of the run."""
        config = self.config
        warmup = min(1.0, (self.step + 1) / max(config.warmup_steps, 1))
        return config.learning_rate * warmup * (0.55 + 0.45 * math.cos(math.pi * fraction))

    def log(self, record: dict) -> None:
        with (self.out_dir / LOG_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def run(self, batches: Iterator[Batch], limits: RunLimits,
            evaluate: Callable[[], dict] | None = None,
            on_checkpoint: Callable[[], None] | None = None,
            final_evaluate: Callable[[], dict] | None = None) -> None:
        """Train until a limit; `evaluate` runs every eval_every steps, `final_evaluate`
        (default: `evaluate`) at the end."""
        def progress_fraction() -> float:
            """How far through the run (the nearest limit decides), 0..1."""
            fractions = [self.step / limits.max_steps if limits.max_steps else 0,
                         self.tokens_seen / limits.max_tokens if limits.max_tokens else 0,
                         self.seconds / limits.max_seconds if limits.max_seconds else 0]
            return min(max(fractions), 1.0)

        def done() -> bool:
            has_limit = limits.max_steps or limits.max_tokens or limits.max_seconds
            return bool(has_limit) and progress_fraction() >= 1.0

        total = limits.max_tokens or None
        progress = tqdm(total=total, initial=self.tokens_seen if total else 0, unit="tok",
                        unit_scale=True, desc="train", dynamic_ncols=True)
        self.model.train()
        self._next_eval_seconds = self.seconds + limits.eval_every_seconds
        window: list[tuple[float, float]] = []
        while not done():
            start = time.perf_counter()
            batch = next(batches)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                output = draft_loss(self.model, batch, self.config, self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.config.grad_clip_value)
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(progress_fraction())
            self.optimizer.step()
            trained = int(batch.loss_mask[:, 1:].sum())
            self.step += 1
            self.tokens_seen += trained
            self.seconds += time.perf_counter() - start
            window = [*window[-49:], (output.top1_agreement, float(output.loss.detach()))]
            progress.update(trained)
            progress.set_postfix(step=self.step, loss=f"{np.mean([w[1] for w in window]):.3f}",
                                 top1=f"{np.mean([w[0] for w in window]):.3f}")
            record = {"step": self.step, "tokens": self.tokens_seen,
                      "seconds": round(self.seconds, 2), "loss": float(output.loss.detach()),
                      "feature_loss": output.feature_loss, "ce_loss": output.ce_loss,
                      "top1": output.top1_agreement,
                      "lr": self.optimizer.param_groups[0]["lr"]}
            if evaluate and self._eval_due(limits):
                self.model.eval()
                record["eval"] = evaluate()
                self.model.train()
                progress.write(f"step {self.step}: {record['eval']}")
            if self.step % 10 == 0 or "eval" in record:
                self.log(record)
            if limits.checkpoint_every and self.step % limits.checkpoint_every == 0:
                self.save_state()
                if on_checkpoint:
                    on_checkpoint()
        progress.close()
        self.model.eval()
        self.save_state()
        if on_checkpoint:
            on_checkpoint()
        final_evaluate = final_evaluate or evaluate
        if final_evaluate:
            self.log({"step": self.step, "tokens": self.tokens_seen,
                      "seconds": round(self.seconds, 2), "eval": final_evaluate()})

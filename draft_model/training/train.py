"""The draft's training objective and optimiser (docs/training.md).

Pair t = (f_t, x_{t+1}) → draft output f̂_{t+1}. Loss per pair, where the *target* side is
the real next feature f_{t+1}:
    SmoothL1(f̂_{t+1}, f_{t+1}) + 0.1 · CE(softmax(head(f_{t+1})), log_softmax(head(f̂_{t+1})))
counted where token t+1 is a trained (assistant) token. Uniform noise on input features.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from draft_model.model import DraftModel


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 2000
    grad_clip_value: float = 0.5
    feature_weight: float = 1.0
    ce_weight: float = 0.1
    noise: float = 0.2  # uniform input-feature noise: (rand − 0.5) · noise · 512 / L


@dataclass(frozen=True)
class Batch:
    features: torch.Tensor  # [B, T, H] the target's post-norm features
    tokens: torch.Tensor  # [B, T] input ids
    loss_mask: torch.Tensor  # [B, T] 1 where the token is trained on (assistant text)


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    feature_loss: float
    ce_loss: float
    top1_agreement: float  # draft head argmax == target head argmax, over masked pairs


def draft_loss(model: DraftModel, batch: Batch, config: TrainConfig,
               generator: torch.Generator | None = None) -> LossOutput:
    features, tokens = batch.features, batch.tokens
    length = features.shape[1] - 1
    inputs = features[:, :-1]  # f_t
    if config.noise > 0:
        noise = torch.rand(inputs.shape, generator=generator, device=inputs.device) - 0.5
        inputs = inputs + noise.to(inputs.dtype) * config.noise * 512 / max(length, 1)
    positions = torch.arange(length, device=features.device).expand(features.shape[0], -1)
    predicted = model(inputs, tokens[:, 1:], positions)  # [B, L, H] ≈ f_{t+1}
    target = features[:, 1:].to(predicted.dtype)
    mask = batch.loss_mask[:, 1:].to(predicted.dtype)  # [B, L]
    num_masked = mask.sum().clamp(min=1)

    feature_loss = (F.smooth_l1_loss(predicted, target, reduction="none").mean(-1) * mask).sum()
    target_logits = model.head_logits(target).float()
    draft_logits = model.head_logits(predicted).float()
    target_probs = torch.softmax(target_logits, dim=-1)
    ce = -(target_probs * torch.log_softmax(draft_logits, dim=-1)).sum(-1)
    ce_loss = (ce * mask).sum()
    loss = (config.feature_weight * feature_loss + config.ce_weight * ce_loss) / num_masked
    with torch.no_grad():
        agree = (draft_logits.argmax(-1) == target_logits.argmax(-1)).to(mask.dtype)
        top1 = float((agree * mask).sum() / num_masked)
    return LossOutput(loss, float(feature_loss.detach() / num_masked),
                      float(ce_loss.detach() / num_masked), top1)


def make_optimizer(model: DraftModel, config: TrainConfig):
    """AdamW over the trainable parameters with a linear warmup; (optimizer, scheduler)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, betas=config.betas)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, scheduler


def train_steps(model: DraftModel, batches: Iterator[Batch], num_steps: int,
                config: TrainConfig, seed: int = 0) -> list[float]:
    """Plain training loop; returns the loss of every step."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    optimizer, scheduler = make_optimizer(model, config)
    model.train()
    losses = []
    for _ in range(num_steps):
        output = draft_loss(model, next(batches), config, generator)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), config.grad_clip_value)
        optimizer.step()
        scheduler.step()
        losses.append(float(output.loss.detach()))
    model.eval()
    return losses

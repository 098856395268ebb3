"""Draft checkpoints: `model.safetensors` (trainable weights + head vocabulary) and
`config.json` (draft shape + the target it was trained for). Loading is strict."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from draft_model.config import DraftConfig, TargetInfo
from draft_model.model import DraftModel
from draft_model.target_weights import TargetWeights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "dovetail-dgf-draft"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The checkpoint is unreadable or does not fit the target."""


def save_checkpoint(model: DraftModel, target: TargetInfo, directory: Path | str,
                    training: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Weights are stored in `dtype` (half by default: the draft runs in half precision on a
    GPU, and it halves the file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu", dtype if tensor.is_floating_point()
                                      else tensor.dtype).contiguous()
             for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    config = {"format": FORMAT, "version": FORMAT_VERSION, "draft": model.config.to_dict(),
              "target": vars(target), "training": training or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_checkpoint_config(directory: Path | str) -> tuple[DraftConfig, TargetInfo, dict]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a draft checkpoint (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} checkpoint")
        return (DraftConfig.from_dict(data["draft"]), TargetInfo(**data["target"]),
                data.get("training", {}))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed draft config: {error}") from error


def load_checkpoint(directory: Path | str, target: TargetWeights,
                    device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> DraftModel:
    """Build the draft for `target` and load its weights; refuse any mismatch."""
    directory = Path(directory)
    config, trained_for, _ = read_checkpoint_config(directory)
    differences = trained_for.differences(target.info)
    if config.hidden_size != target.info.hidden_size:
        differences.append(f"draft hidden_size {config.hidden_size} ≠ target "
                           f"{target.info.hidden_size}")
    if differences:
        raise CheckpointError(f"draft checkpoint {directory} was trained for another target: "
                              + "; ".join(differences))
    state = load_file(str(directory / WEIGHTS_FILE))
    head_ids = state.get("head_token_ids")
    model = DraftModel(config, torch.from_numpy(target.embedding),
                       torch.from_numpy(target.lm_head), head_token_ids=head_ids)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(name for name in set(expected) & set(state)
                         if expected[name].shape != state[name].shape)
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"draft checkpoint {directory} does not match its config: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}; "
            f"wrong shape {wrong_shape or 'none'}")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).requires_grad_(False)

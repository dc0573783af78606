"""Checkpoints: plain dicts of tensors and data, written atomically, loaded with
``torch.load(weights_only=True)`` so that a file carrying code is refused, never run.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from . import __version__
from .config import Config
from .errors import CheckpointError, ConfigError
from .io.atomic import atomic_path

FORMAT = "napari-var-emitter-checkpoint-v1"


def save_checkpoint(path, model_state: dict, config: Config, **extra) -> None:
    """Write a checkpoint atomically (temporary file + rename: a crash or ``kill -9`` during
    the write leaves the previous checkpoint intact)."""
    payload = {"format": FORMAT, "package_version": __version__, "config": config.to_dict(),
               "model": {k: v.detach().cpu() for k, v in model_state.items()}}
    payload.update(extra)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            # on disk before the rename: a power cut cannot leave a renamed empty file
            os.fsync(fh.fileno())


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and check a checkpoint; every problem is a one-line :class:`CheckpointError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such checkpoint file")
    if os.path.isdir(path):
        raise CheckpointError(path, "is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise CheckpointError(path, f"cannot read ({e.strerror or e})") from None
    if head[:1] == b"\x80" and not zipfile.is_zipfile(path):
        # a bare pickle stream (not torch.save's zip container): pickles can carry code
        raise CheckpointError(path, "refused: a raw Python pickle, not a PyTorch checkpoint; "
                              "it was not loaded (a pickle can carry code)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(path, "not a PyTorch checkpoint (torch.save writes a zip "
                              "archive; this file is not one)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(e)
        if "GLOBAL" in detail:
            # weights_only refuses any global it does not know: a pickle that carries code
            raise CheckpointError(path, "refused: the file holds Python objects other than "
                                  "tensors and plain data (possibly code); nothing in it was "
                                  f"executed ({detail})") from None
        raise CheckpointError(path, f"not a readable checkpoint ({detail})") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes break torch.load in many ways
        # (IndexError, struct.error, MemoryError-free stack faults of the weights-only
        # unpickler ...); code was never run, the file is simply not a checkpoint
        raise CheckpointError(path, f"not a readable checkpoint ({type(e).__name__}: "
                              f"{_first(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(path, "not a napari-var-emitter checkpoint (format key missing)")
    weights = ckpt.get("model")
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise CheckpointError(path, "checkpoint has no model weights (a dict of tensors)")
    try:
        ckpt["config_obj"] = Config.from_dict(ckpt["config"])
    except (ConfigError, KeyError) as e:
        raise CheckpointError(path, f"its model configuration is invalid ({e})") from None
    return ckpt


def build_model_from_checkpoint(ckpt: dict, path="checkpoint"):
    """Instantiate :class:`VarEmitterNet` from a loaded checkpoint and load its weights."""
    from .model import VarEmitterNet

    model = VarEmitterNet(ckpt["config_obj"].model)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(path, "weights do not match the model architecture of its "
                              f"config ({_first(e)})") from None
    return model


def _unpickling_detail(e: BaseException) -> str:
    """The informative line of torch's weights-only refusal (its first line is a long
    explanation of the PyTorch 2.6 default change)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln[:200]
    return _first(e)


def _first(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]

"""The steps every command that loads a model shares (``relabel_file``, ``embed_file``) before it loads it."""

from __future__ import annotations

import torch

from vlmlabel.device import default_batch_size
from vlmlabel.errors import VlmlabelError
from vlmlabel.files.interrupt import check, pause_at


def resolve_batch_size(requested: int | None, device: torch.device) -> int:
    """The batch size asked for (at least 1), else the device's default."""
    if requested is not None and requested < 1:
        raise VlmlabelError(f"--batch-size must be at least 1, not {requested}")
    return requested or default_batch_size(device)


def model_loads() -> None:
    """The end of the open phase: a signal held while the lock was taken stops the run before the model loads."""
    pause_at("open")
    check()

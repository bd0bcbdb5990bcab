"""The steps every command that loads a model shares (``relabel_file``, ``embed_file``) before it loads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmlabel.device import default_batch_size, resolve_device, resolve_precision
from vlmlabel.errors import VlmlabelError
from vlmlabel.files.interrupt import check, pause_at
from vlmlabel.sources.base import VideoDecoder
from vlmlabel.sources.video import nvdec_gpu


@dataclass(frozen=True)
class Machine:
    """Where and how the model runs: the device, its precision, the batch size, and the CUDA device whose NVDEC
    decodes video (None: the CPU decodes it)."""

    device: torch.device
    precision: str
    batch_size: int
    nvdec: int | None

    @classmethod
    def of(cls, device: str, precision: str, batch_size: int | None, video_decoder: VideoDecoder) -> Machine:
        """The options as asked (``auto`` resolved), each refused in one line when it cannot work here."""
        resolved = resolve_device(device)
        return cls(
            resolved,
            resolve_precision(precision, resolved),
            resolve_batch_size(batch_size, resolved),
            nvdec_gpu(video_decoder, resolved),
        )


def resolve_batch_size(requested: int | None, device: torch.device) -> int:
    """The batch size asked for (at least 1), else the device's default."""
    if requested is not None and requested < 1:
        raise VlmlabelError(f"--batch-size must be at least 1, not {requested}")
    return requested or default_batch_size(device)


def model_loads() -> None:
    """The end of the open phase: a signal held while the lock was taken stops the run before the model loads."""
    pause_at("open")
    check()

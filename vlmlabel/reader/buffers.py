"""The host side of a batch: a fixed pool of reusable buffers that frames are read or decoded into, and the
``Batch`` the model takes from one.

Memory stays flat whatever the dataset's length: a buffer is written again only once the model (or its copy
to the device) has released it.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import torch

RAW_AXES = ("HWC", "CHW", "HW")


class HostBuffer:
    """One reusable host buffer for a batch of frames (``array`` is a numpy view of ``tensor``; ``slot``: its
    place in its pool, which names it to decoding workers)."""

    def __init__(self, tensor: torch.Tensor, pool: BufferPool | None, slot: int = 0):
        self.tensor = tensor
        self.slot = slot
        self.array = tensor.numpy()
        self.pool = pool
        self.event: torch.cuda.Event | None = None
        self.busy = True

    def release(self, event: torch.cuda.Event | None = None) -> None:
        """Give the buffer back; ``event`` marks the end of its copy to the device. Idempotent."""
        if self.busy and self.pool is not None:
            self.busy = False
            self.event = event
            self.pool.free.put(self)


class BufferPool:
    """A fixed set of host buffers: memory stays flat whatever the file length.

    Pinned on CUDA so copies to the GPU are asynchronous; a buffer is written again only once
    the copy recorded by its event has completed. ``shared``: in shared memory, so decoding worker
    processes write into them (not pinned then).
    """

    def __init__(self, count: int, shape: tuple[int, ...], pin: bool, shared: bool = False):
        self.free: queue.Queue[HostBuffer] = queue.Queue()
        self.buffers = []
        for slot in range(count):
            tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=pin and not shared)
            buffer = HostBuffer(tensor.share_memory_() if shared else tensor, self, slot)
            buffer.busy = False
            self.buffers.append(buffer)
            self.free.put(buffer)

    def acquire(self) -> HostBuffer:
        buffer = self.free.get()
        if buffer.event is not None:
            buffer.event.synchronize()
            buffer.event = None
        buffer.busy = True
        return buffer


@dataclass
class Batch:
    """Frames ready for the device.

    form HWC/CHW/HW: one uint8 tensor of frames as stored, or decoded (``DECODED_AXES``), in ``buffer``;
    "decoded": CHW tensors (views) of different sizes; "jpeg": undecoded JPEG bytes, decoded on the device.
    """

    frames: torch.Tensor | list[torch.Tensor]
    size: int
    form: str
    buffer: HostBuffer | None = field(default=None, repr=False)

    def release(self, event: torch.cuda.Event | None = None) -> None:
        if self.buffer is not None:
            self.buffer.release(event)


def as_nchw(frames: torch.Tensor, axes: str) -> torch.Tensor:
    """A view of raw frames as (N, C, H, W); done on the device so host copies stay plain memcpy."""
    if axes == "HWC":
        return frames.permute(0, 3, 1, 2)
    if axes == "HW":
        return frames.unsqueeze(1)
    return frames

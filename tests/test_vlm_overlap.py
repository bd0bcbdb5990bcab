"""The VLM scorer's overlapped path (a thread prepares the next batch while the model answers this one, as on an
accelerator) writes the same rewards as the path that takes turns, and leaves no thread behind."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest

from tests import layouts
from vlmlabel.formulation import RewardConfig
from vlmlabel.queries import Context, JudgeSpec
from vlmlabel.run.lifecycle import relabel_file
from vlmlabel.run.request import RelabelRequest
from vlmlabel.scorers import vlm

GOAL = "the red ball is on the green square"


def _relabel(source, output, model) -> dict[str, np.ndarray]:
    spec = JudgeSpec(context=Context.window, context_frames=3)
    request = RelabelRequest(
        source=source,
        goals=[GOAL],
        model=str(model),
        scorer="vlm",
        output=output,
        device="cpu",
        batch_size=4,  # several batches, the last one short
        formulation=RewardConfig(goals=[GOAL], judge=spec),
        workers=0,
    )
    relabel_file(request)
    with h5py.File(output) as f:
        return {name: f[name][()] for name in f if "reward" in name}


@pytest.mark.slow
def test_overlapped_batches_write_the_same_rewards(tiny_vlm, tmp_path, monkeypatch, one_thread):
    source = layouts.build_flat_d4rl(tmp_path / "flat.h5").path
    model = tiny_vlm("qwen2_vl")
    threads: list[str] = []
    real = vlm.prefetch
    monkeypatch.setattr(
        vlm, "prefetch", lambda items, depth, release, name: threads.append(name) or real(items, depth, release, name)
    )
    monkeypatch.setattr(vlm, "OVERLAP_ON_CPU", False)
    turns = _relabel(source, tmp_path / "turns.h5", model)
    assert threads == []  # the CPU takes turns
    monkeypatch.setattr(vlm, "OVERLAP_ON_CPU", True)
    overlapped = _relabel(source, tmp_path / "overlapped.h5", model)
    assert threads == [vlm.PREPARER]
    assert turns and turns.keys() == overlapped.keys()
    for name, values in turns.items():
        np.testing.assert_array_equal(overlapped[name], values, err_msg=name)
    assert not any(t.name == vlm.PREPARER and t.is_alive() for t in threading.enumerate())

"""tools/synthetic/tiny_vlm.py: each family's tiny VLM loads offline through the Auto classes, takes chat
templates with images (and video where the family has it), generates, runs left-padded mixed batches, and is
reproducible from its seed."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from tools.synthetic import tiny_vlm  # noqa: E402

VIDEO_FAMILIES = ("qwen2_vl", "qwen3_vl")


def _frames(k: int, seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (k, h, w, 3), dtype=np.uint8)


def _messages(goal: str, n_images: int = 0, video: bool = False) -> list[dict]:
    items: list[dict] = [{"type": "image"} for _ in range(n_images)]
    if video:
        items.append({"type": "video"})
    items.append({"type": "text", "text": f"Is {goal} done? Answer True or False."})
    return [{"role": "user", "content": items}]


def _video_kwargs(videos: list[np.ndarray], fps: float = 10.0) -> dict:
    """Frames already chosen by the caller: their metadata (fps, indices), so the processor does not resample."""
    meta = [{"total_num_frames": len(v), "fps": fps, "frames_indices": list(range(len(v)))} for v in videos]
    return {"videos": videos, "video_metadata": meta, "do_sample_frames": False}


@pytest.fixture(scope="module")
def loaded(tiny_vlm):
    cache: dict[str, tuple] = {}

    def load(family: str) -> tuple:
        if family not in cache:
            folder = tiny_vlm(family)
            model = AutoModelForImageTextToText.from_pretrained(folder)
            cache[family] = (AutoProcessor.from_pretrained(folder), model.eval())
        return cache[family]

    return load


def test_offline_environment():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("family", tiny_vlm.FAMILIES)
def test_folder_is_a_plain_hf_model(tiny_vlm, family):
    folder = tiny_vlm(family)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert AutoConfig.from_pretrained(folder).model_type == family
    assert (folder / "model.safetensors").stat().st_size < 2_000_000


@pytest.mark.parametrize("family", tiny_vlm.FAMILIES)
@pytest.mark.parametrize("n_images", [1, 3])
def test_images_generate(loaded, family, n_images):
    processor, model = loaded(family)
    text = processor.apply_chat_template(
        _messages("the red ball", n_images), add_generation_prompt=True, tokenize=False
    )
    assert text.count(processor.image_token) == n_images
    images = list(_frames(n_images, seed=n_images))
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, do_sample=False
        )
    assert out.logits[0].shape == (1, len(processor.tokenizer))
    assert torch.isfinite(out.logits[0]).all()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_video_generate(loaded, family, k):
    """A clip of K frames: the processor pads an odd K to the temporal patch (2) by repeating the last frame, so
    its temporal grid is ceil(K / 2)."""
    processor, model = loaded(family)
    text = processor.apply_chat_template(
        _messages("the red ball", video=True), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], **_video_kwargs([_frames(k, seed=k)]), return_tensors="pt")
    assert inputs["video_grid_thw"][0, 0].item() == (k + 1) // 2
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, do_sample=False
        )
    assert torch.isfinite(out.logits[0]).all()


def test_video_of_one_frame(loaded):
    """K = 1 as a video: Qwen2-VL repeats the frame; Qwen3-VL's video processor refuses it (send it as an image)."""
    text = {}
    for family in VIDEO_FAMILIES:
        processor, _ = loaded(family)
        text[family] = processor.apply_chat_template(
            _messages("g", video=True), add_generation_prompt=True, tokenize=False
        )
    processor, _ = loaded("qwen2_vl")
    inputs = processor(text=[text["qwen2_vl"]], **_video_kwargs([_frames(1, seed=0)]), return_tensors="pt")
    assert inputs["video_grid_thw"][0, 0].item() == 1
    processor, _ = loaded("qwen3_vl")
    with pytest.raises(ValueError, match="temporal_factor"):
        processor(text=[text["qwen3_vl"]], **_video_kwargs([_frames(1, seed=0)]), return_tensors="pt")


GOALS = ("the red ball", "the red ball is on the green square near the robot arm")
FRAME_COUNTS = {"qwen2_vl": (2, 6), "qwen3_vl": (2, 6), "idefics3": (1, 3)}  # video frames or images


def test_qwen3_vl_resamples_video_unless_told_not_to(loaded):
    """Qwen3-VL's processor keeps transformers' default of resampling a clip to 2 fps (at least 4 frames): 8
    frames at 10 fps become 4 (2 temporal patches), with timestamps; do_sample_frames=False keeps all 8."""
    processor, _ = loaded("qwen3_vl")
    text = processor.apply_chat_template(_messages("g", video=True), add_generation_prompt=True, tokenize=False)
    frames = [_frames(8, seed=0)]
    kwargs = _video_kwargs(frames)
    kept = processor(text=[text], **kwargs, return_tensors="pt")
    del kwargs["do_sample_frames"]
    resampled = processor(text=[text], **kwargs, return_tensors="pt")
    assert (kept["video_grid_thw"][0, 0].item(), resampled["video_grid_thw"][0, 0].item()) == (4, 2)
    assert "seconds>" in processor.tokenizer.decode(kept["input_ids"][0])


def _batch(processor, family: str, padding_side: str = "left"):
    """Two queries with different goal lengths and frame counts (frames of query i drawn with seed i + 1)."""
    processor.tokenizer.padding_side = padding_side
    counts = FRAME_COUNTS[family]
    frames = [_frames(k, seed=i + 1) for i, k in enumerate(counts)]
    if family in VIDEO_FAMILIES:
        texts = [
            processor.apply_chat_template(_messages(g, video=True), add_generation_prompt=True, tokenize=False)
            for g in GOALS
        ]
        return processor(text=texts, **_video_kwargs(frames), padding=True, return_tensors="pt")
    texts = [
        processor.apply_chat_template(_messages(g, k), add_generation_prompt=True, tokenize=False)
        for g, k in zip(GOALS, counts, strict=True)
    ]
    return processor(text=texts, images=[list(f) for f in frames], padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", tiny_vlm.FAMILIES)
def test_left_padded_mixed_batch_forward(loaded, family):
    processor, model = loaded(family)
    inputs = _batch(processor, family)
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]  # left padding: the shorter query starts with pads
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    assert logits.shape == (2, 1, len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def _single_log_probs(processor, model, family: str, index: int) -> torch.Tensor:
    """transformers' own generation on query ``index`` of ``_batch`` alone: the next token's log-probabilities."""
    goal, k = (GOALS[index], FRAME_COUNTS[family][index])
    video = family in VIDEO_FAMILIES
    text = processor.apply_chat_template(
        _messages(goal, 0 if video else k, video=video), add_generation_prompt=True, tokenize=False
    )
    frames = _frames(k, seed=index + 1)
    media = _video_kwargs([frames]) if video else {"images": [list(frames)]}
    inputs = processor(text=[text], **media, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, do_sample=False)
    return torch.log_softmax(out.logits[0][0].float(), dim=-1)


@pytest.mark.parametrize("family", tiny_vlm.FAMILIES)
def test_fit_for_exactness_tests(loaded, family):
    """The tiny models discriminate what the judge's tests check: a left-padded batch read at the last position
    equals transformers' generation on each query alone (1e-5), a right-padded batch read at [:, -1] is far off
    (> 1e-2), and the readout depends on the frames (> 1e-4)."""
    processor, model = loaded(family)
    singles = [_single_log_probs(processor, model, family, i) for i in range(2)]
    for side in ("left", "right"):
        inputs = _batch(processor, family, padding_side=side)
        with torch.no_grad():
            batch = torch.log_softmax(model(**inputs, logits_to_keep=1).logits[:, -1].float(), dim=-1)
        errors = [float((batch[i] - singles[i]).abs().max()) for i in range(2)]
        if side == "left":
            assert max(errors) < 1e-5, errors
        else:
            assert errors[0] > 1e-2, errors  # the shorter query is the one padded
    (true_id,) = processor.tokenizer.encode(" True", add_special_tokens=False)
    readouts = []
    for seed in (10, 11):
        frames = list(_frames(1, seed=seed))
        text = processor.apply_chat_template(_messages(GOALS[0], 1), add_generation_prompt=True, tokenize=False)
        with torch.no_grad():
            logits = model(**processor(text=[text], images=frames, return_tensors="pt")).logits[0, -1]
        readouts.append(float(torch.log_softmax(logits, dim=-1)[true_id]))
    assert abs(readouts[0] - readouts[1]) > 1e-4, readouts


def _sha(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("family", tiny_vlm.FAMILIES)
def test_seeded_and_quick(tmp_path, family):
    start = time.perf_counter()
    a = tiny_vlm.build_tiny_vlm(family, tmp_path / "a", seed=3)
    elapsed = time.perf_counter() - start
    b = tiny_vlm.build_tiny_vlm(family, tmp_path / "b", seed=3)
    c = tiny_vlm.build_tiny_vlm(family, tmp_path / "c", seed=4)
    print(f"{family}: built in {elapsed:.2f} s, {(a / 'model.safetensors').stat().st_size} bytes")
    assert elapsed < 10
    assert _sha(a) == _sha(b) != _sha(c)
    for name in ("tokenizer.json", "config.json", "processor_config.json", "chat_template.jinja"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tokenizer_answers_and_multi_token_word():
    tok = tiny_vlm.train_tokenizer(tiny_vlm.QWEN_SPECIALS, extra_words=["red ball green square"])
    for word in (*tiny_vlm.REQUIRED_SINGLE, " red", "square", " green"):
        assert len(tok.encode(word).ids) == 1, word
    assert len(tok.encode(tiny_vlm.MULTI_TOKEN_WORD).ids) > 1
    assert [tok.id_to_token(i) for i in range(len(tiny_vlm.QWEN_SPECIALS))] == list(tiny_vlm.QWEN_SPECIALS)
    assert tok.get_vocab_size() < 1000
    assert tok.decode(tok.encode("Is the robot done? 0.5 seconds").ids) == "Is the robot done? 0.5 seconds"


@pytest.mark.parametrize("family", tiny_vlm.FAMILIES)
def test_overrides(tmp_path, family):
    """A bigger model (as the sample trainer builds) with a scene vocabulary: sizes reach the config, frames
    the processor's grid, and it still generates."""
    folder = tiny_vlm.build_tiny_vlm(
        family, tmp_path / family, hidden_size=64, layers=2, heads=4, image_size=64, extra_words=["red ball"]
    )
    config = AutoConfig.from_pretrained(folder)
    text_config = config.text_config
    assert (text_config.hidden_size, text_config.num_hidden_layers, text_config.num_attention_heads) == (64, 2, 4)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert processor.tokenizer.tokenize(" ball red") == ["Ġball", "Ġred"]
    text = processor.apply_chat_template(_messages("the red ball", 1), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=list(_frames(1, seed=0, h=64, w=64)), return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == (64 // 8) ** 2 // 4  # 8 x 8 patches of 8 px, merged 2 x 2
    out = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    assert torch.isfinite(out.logits[0]).all()
    with pytest.raises(TypeError, match="unknown override"):
        tiny_vlm.build_tiny_vlm(family, tmp_path / "bad", hidden=3)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_vlm.build_tiny_vlm(family, tmp_path / "bad", image_size=40)


def test_remote_code_model_needs_trust(tmp_path):
    folder = tiny_vlm.build_remote_code_vlm(tmp_path / "remote")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(folder, trust_remote_code=False)


def test_text_only_model_has_no_vision_tower(tmp_path):
    folder = tiny_vlm.build_text_only_lm(tmp_path / "lm")
    config = AutoConfig.from_pretrained(folder)
    assert getattr(config, "vision_config", None) is None
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "qwen2"
    with pytest.raises(ValueError):
        AutoModelForImageTextToText.from_pretrained(folder)

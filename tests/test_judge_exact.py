"""The judge's batched readouts equal transformers' own generation, one query at a time, for each family.

The oracle is computed here, independently of ``vlmlabel.judge``'s code path: a freshly loaded model and
processor, one query rendered with the chat template and processed alone (no padding), and
``generate(max_new_tokens=1, output_logits=True, output_scores=True, return_dict_in_generate=True)``; the readout
is then worked out in float64 from the first step's logits. The judge's batches mix frame counts (K = 1..4) and
goal lengths, so its rows are padded differently from one another; a right-padded batch read at ``[:, -1]`` is
shown to miss the same tolerance, so these tests would catch it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from vlmlabel import judge as J  # noqa: E402
from vlmlabel.errors import VlmlabelError  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen3_vl", "idefics3")
TOLERANCE = 1e-5
GOALS = (
    "reach",
    "put the red ball on the green square and then move the arm back to where it started",
    "open it",
    "is the gripper closed around the object",
)
FRAME_COUNTS = (1, 2, 3, 4)
FRAME_SIZES = ((32, 32), (40, 48), (48, 40), (32, 64))  # (H, W): the processors resize each query its own way
READOUTS = {
    "logprob": J.LogProb(" True"),
    "ratio": J.Ratio(" True", " False"),
    "expected": J.parse_readout(None, None, "1=0,2=0.25,3=0.5,4=0.75,5=1"),
}


def mixed_queries(seed: int = 0, fps: float = 10.0) -> list[J.Query]:
    """Four queries: K = 1, 2, 3, 4 frames of different sizes, with short and long goals, in one batch."""
    rng = np.random.default_rng(seed)
    return [
        J.Query(rng.integers(0, 256, (k, h, w, 3), dtype=np.uint8), goal, fps)
        for k, (h, w), goal in zip(FRAME_COUNTS, FRAME_SIZES, GOALS, strict=True)
    ]


@pytest.fixture(scope="module")
def loaded(tiny_vlm):
    """(family) -> (card, the oracle's own model and processor), each loaded once."""
    cache: dict[str, tuple[J.JudgeCard, object, object]] = {}

    def get(family: str):
        if family not in cache:
            folder = tiny_vlm(family)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            cache[family] = (J.describe_judge(str(folder)), model, AutoProcessor.from_pretrained(folder))
        return cache[family]

    return get


def judge_for(card: J.JudgeCard, readout: J.Readout) -> J.Judge:
    return J.load_judge(card, readout, J.default_prompt(readout), torch.device("cpu"), "fp32")


def oracle_inputs(processor, card: J.JudgeCard, query: J.Query, prompt: str):
    """One query as transformers' documented multimodal path takes it: its chat template, then its processor."""
    video = card.takes_video and len(query.frames) > 1
    shown = [{"type": "video"}] if video else [{"type": "image"}] * len(query.frames)
    text = prompt.replace("{goal}", query.goal)
    messages = [{"role": "user", "content": [*shown, {"type": "text", "text": text}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if video:
        count = len(query.frames)
        metadata = {"total_num_frames": count, "fps": query.fps, "frames_indices": list(range(count))}
        return processor(
            text=[rendered],
            videos=[query.frames],
            video_metadata=[metadata],
            do_sample_frames=False,
            return_tensors="pt",
        )
    return processor(text=[rendered], images=list(query.frames), return_tensors="pt")


def oracle_logprobs(model, processor, card: J.JudgeCard, query: J.Query, prompt: str) -> np.ndarray:
    """log P of every token at the first generated step, in float64, from ``generate`` on the query alone."""
    inputs = oracle_inputs(processor, card, query, prompt)
    assert int(inputs["attention_mask"].min()) == 1  # alone: nothing padded
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert len(out.logits) == 1 and len(out.scores) == 1
    return torch.log_softmax(out.logits[0][0].double(), dim=-1).numpy()


def readout_of(readout: J.Readout, logp: np.ndarray, ids: dict[str, int]) -> float:
    """The readouts as the issue defines them, on probabilities (float64)."""
    p = {answer: float(np.exp(logp[ids[answer]])) for answer in readout.answers}
    if isinstance(readout, J.LogProb):
        return float(logp[ids[readout.answer]])
    if isinstance(readout, J.Ratio):
        return p[readout.answer] / (p[readout.answer] + p[readout.versus])
    assert isinstance(readout, J.Expected)
    return sum(value * p[answer] for answer, value in readout.values) / sum(p.values())


def answer_ids(processor, readout: J.Readout) -> dict[str, int]:
    ids = {answer: processor.tokenizer.encode(answer, add_special_tokens=False) for answer in readout.answers}
    assert all(len(one) == 1 for one in ids.values()), ids
    return {answer: one[0] for answer, one in ids.items()}


def oracle(family_loaded, readout: J.Readout, queries: list[J.Query]) -> np.ndarray:
    card, model, processor = family_loaded
    ids = answer_ids(processor, readout)
    prompt = J.default_prompt(readout)
    return np.array([readout_of(readout, oracle_logprobs(model, processor, card, q, prompt), ids) for q in queries])


@pytest.mark.parametrize("name", sorted(READOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_readouts_equal_generate_one_query_at_a_time(loaded, family, name, one_thread):
    readout = READOUTS[name]
    queries = mixed_queries()
    judge = judge_for(loaded(family)[0], readout)
    batch = judge.inputs(queries)
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == len(queries)  # every row padded differently
    assert bool((batch["attention_mask"][:, -1] == 1).all())  # on the left
    got = judge.readouts(queries)
    assert np.array_equal(judge.readouts_of(batch), got)  # a batch prepared ahead reads the same
    want = oracle(loaded(family), readout, queries)
    assert got.dtype == np.float32 and got.shape == (len(queries),)
    error = np.abs(got.astype(np.float64) - want).max()
    print(f"{family} {name}: max abs error {error:.3g}")
    assert error <= TOLERANCE, (family, name, got, want)


def right_padded(judge: J.Judge, queries: list[J.Query]):
    """The judge's batch, padded on the right instead."""
    judge.processor.tokenizer.padding_side = "right"
    try:
        batch = judge.processor(
            text=[judge._text(q) for q in queries],
            padding=True,
            padding_side="right",
            return_tensors="pt",
            **_pixels(judge, queries),
        )
    finally:
        judge.processor.tokenizer.padding_side = "left"
    assert int(batch["attention_mask"][:, -1].min()) == 0  # some rows really end in padding
    return batch


def right_padded_last_column(judge: J.Judge, queries: list[J.Query]) -> np.ndarray:
    """The mistake the judge must not make: pad on the right and read every row at ``[:, -1]``."""
    batch = right_padded(judge, queries)
    mask = batch["attention_mask"]
    extra = {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)} if judge._positions_from_mask else {}
    with torch.no_grad():
        logits = judge.model(**batch, **extra, use_cache=False).logits[:, -1]
    logp = torch.log_softmax(logits.float(), dim=-1)[:, list(judge.answer_ids)]
    return judge.readout.value(logp).numpy()


def _pixels(judge: J.Judge, queries: list[J.Query]) -> dict:
    videos = [q for q in queries if judge.as_video(q)]
    images = [frame for q in queries if not judge.as_video(q) for frame in q.frames]
    shown: dict = {"images": images}
    if videos:
        shown |= {
            "videos": [q.frames for q in videos],
            "video_metadata": [
                {"total_num_frames": len(q.frames), "fps": q.fps, "frames_indices": list(range(len(q.frames)))}
                for q in videos
            ],
            "do_sample_frames": False,
        }
    return shown


@pytest.mark.parametrize("name", ["logprob", "ratio"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_right_padded_batch_read_at_the_last_column_fails_the_tolerance(loaded, family, name, one_thread):
    readout = READOUTS[name]
    queries = mixed_queries()
    wrong = right_padded_last_column(judge_for(loaded(family)[0], readout), queries)
    error = np.abs(wrong - oracle(loaded(family), readout, queries)).max()
    print(f"{family} {name}: right-padded [:, -1] is off by {error:.3g}")
    assert error > 1e-2  # far outside TOLERANCE: the exactness test above would fail on it


@pytest.mark.parametrize("family", FAMILIES)
def test_the_readout_is_positioned_by_the_attention_mask_even_on_a_right_padded_batch(loaded, family):
    """The judge pads on the left, but it finds each row's last real token from the mask, never at ``[:, -1]``:
    given a right-padded batch it still reads what each query alone reads (only those positions' logits)."""
    readout = READOUTS["logprob"]
    queries = mixed_queries()
    judge = judge_for(loaded(family)[0], readout)
    got = judge.readouts_of(right_padded(judge, queries))
    assert np.abs(got - oracle(loaded(family), readout, queries)).max() <= TOLERANCE


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_several_frames_go_to_a_qwen_model_as_video_and_one_as_an_image(loaded, family):
    judge = judge_for(loaded(family)[0], READOUTS["logprob"])
    one, three = mixed_queries()[0], mixed_queries()[2]
    as_video = judge.inputs([three])
    assert "pixel_values_videos" in as_video and "pixel_values" not in as_video
    assert int(as_video["video_grid_thw"][0, 0]) == 2  # 3 frames, the temporal patch of 2: padded to 4, not sampled
    as_image = judge.inputs([one])
    assert "pixel_values" in as_image and "pixel_values_videos" not in as_image
    assert judge.describe()["frames"].startswith("video")


def test_qwen3_vl_is_told_the_frame_rate(loaded):
    """Qwen3-VL writes each frame's time into the prompt from the video metadata: the query's fps reaches it."""
    judge = judge_for(loaded("qwen3_vl")[0], READOUTS["logprob"])
    frames = mixed_queries()[3].frames
    text = {
        fps: judge.processor.decode(judge.inputs([J.Query(frames, "g", fps)])["input_ids"][0]) for fps in (1.0, 4.0)
    }
    # frames 0..3 in temporal patches of 2: the patches' mean times, at 1 and 4 frames per second
    assert "<0.5 seconds>" in text[1.0] and "<2.5 seconds>" in text[1.0]
    assert "<0.1 seconds>" in text[4.0] and "<0.6 seconds>" in text[4.0]


def test_frames_go_to_idefics3_as_images(loaded):
    judge = judge_for(loaded("idefics3")[0], READOUTS["logprob"])
    batch = judge.inputs([mixed_queries()[2]])
    assert "pixel_values_videos" not in batch
    assert tuple(batch["pixel_values"].shape[:2]) == (1, 3)  # one query, three images
    assert judge.describe()["frames"] == "images"


def test_bf16_on_the_cpu_reads_close_to_fp32_and_auto_is_fp32(loaded):
    card = loaded("qwen3_vl")[0]
    readout = READOUTS["ratio"]
    queries = mixed_queries()
    fp32 = judge_for(card, readout)
    auto = J.load_judge(card, readout, J.default_prompt(readout), torch.device("cpu"), "auto")
    bf16 = J.load_judge(card, readout, J.default_prompt(readout), torch.device("cpu"), "bf16")
    assert auto.precision == "fp32" and bf16.precision == "bf16"
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert np.array_equal(auto.readouts(queries), fp32.readouts(queries))
    got = bf16.readouts(queries)
    assert got.dtype == np.float32 and np.abs(got - fp32.readouts(queries)).max() < 5e-2


def test_fp16_on_the_cpu_is_refused(loaded):
    readout = READOUTS["logprob"]
    with pytest.raises(VlmlabelError) as excinfo:
        J.load_judge(loaded("idefics3")[0], readout, J.default_prompt(readout), torch.device("cpu"), "fp16")
    assert "fp16 is not supported on cpu" in str(excinfo.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_query_tokens_and_the_batch_size_from_the_token_budget(loaded, family):
    card, _, processor = loaded(family)
    judge = judge_for(card, READOUTS["logprob"])
    for query in mixed_queries():
        alone = oracle_inputs(processor, card, query, judge.prompt)
        assert judge.query_tokens(query) == alone["input_ids"].shape[1]
    sample = mixed_queries()[3]
    assert judge.default_batch_size(sample) == J.CPU_TOKEN_BUDGET // judge.query_tokens(sample)
    huge = J.Query(np.zeros((4, 32, 32, 3), np.uint8), "word " * (2 * J.CPU_TOKEN_BUDGET), None)
    assert judge.default_batch_size(huge) == 1


def test_the_judge_describes_what_makes_its_readouts(loaded):
    card = loaded("qwen2_vl")[0]
    readout = READOUTS["expected"]
    described = J.load_judge(card, readout, "Rate {goal}.", torch.device("cpu"), "auto").describe()
    assert described == {
        **card.describe(),
        "prompt": "Rate {goal}.",
        "readout": "expected",
        "answer_values": [["1", 0.0], ["2", 0.25], ["3", 0.5], ["4", 0.75], ["5", 1.0]],
        "precision": "fp32",
        "frames": f"video (fps from the dataset, else {J.DEFAULT_FPS}) when K > 1, else images",
    }
    assert described["model_files_sha256"] and described["family"] == "qwen2_vl"


def test_no_queries_read_nothing_and_frames_of_the_wrong_shape_are_refused(loaded):
    judge = judge_for(loaded("idefics3")[0], READOUTS["logprob"])
    empty = judge.readouts([])
    assert empty.shape == (0,) and empty.dtype == np.float32
    for frames in (
        np.zeros((32, 32, 3), np.uint8),
        np.zeros((0, 32, 32, 3), np.uint8),
        np.zeros((2, 32, 32, 4), np.uint8),
    ):
        with pytest.raises(VlmlabelError) as excinfo:
            judge.readouts([J.Query(frames, "g")])
        assert "a query needs frames (K, H, W, 3) with K >= 1" in str(excinfo.value)

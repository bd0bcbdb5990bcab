"""The VLM judge: a generative vision-language model read as a reward, one next-token distribution per query.

This is the only vlmlabel module that imports transformers (the optional extra ``vlmlabel[vlm]``), and nothing in
vlmlabel imports it at import time: ``scorers/vlm.py`` loads it when ``--scorer vlm`` is asked for.

A query is K frames (oldest first) and a goal. It is rendered with the model's own chat template (one user turn:
the frames, then the prompt with ``{goal}`` filled in; ``add_generation_prompt=True``), run through the model's
own processor, and the readout is taken from the log-probabilities of the token that would come next:

- ``LogProb(answer)``: log P(answer) (TOPReward reads log P(" True"); the default "True" follows the chat
  template's generation prompt, which ends a line in Qwen's templates: give --answer " True" where it does not),
- ``Ratio(answer, versus)``: P(answer) / (P(answer) + P(versus)),
- ``Expected(values)``: sum(v_i p_i) / sum(p_i) over the listed answers (RoboReward-style scores).

Every answer must be one token of the model's tokenizer; a longer one is refused, naming its tokens.

How frames are sent, per model family (``VIDEO_FAMILIES``):

- Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and its MoE): K > 1 frames go as one video, all K frames kept (no frame
  sampling), with fps metadata: ``Query.fps``, the rate of the frames as given, else ``DEFAULT_FPS``. Qwen3-VL
  writes each frame's timestamp into the prompt from it, Qwen2.5-VL spaces its temporal positions by it;
  Qwen2-VL does not use it. K = 1 goes as one image (a video of one frame would be padded to the model's
  temporal patch).
- Every other family (Idefics3 / SmolVLM among them): K images, one after another in the same user turn.

Batching: the processor pads on the left (forced); the readout position is each row's last real token as the
attention mask says, and only those positions' logits are computed (``logits_to_keep``); log_softmax runs in
fp32 over the vocabulary. Positions: models that place multimodal tokens themselves (Qwen's M-RoPE,
``get_rope_index``) compute them from the attention mask; for the others the position ids are the attention
mask's running count, as ``generate`` gives them, so a padded row reads what the query alone reads.

Precision: "fp32" loads fp32 weights and runs without autocast; "bf16"/"fp16" load the weights in that dtype and
run under autocast ("auto" is bf16 on GPUs with bf16, fp16 on older ones, fp32 on the CPU: ``device.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmlabel.device import autocast_dtype, resolve_precision
from vlmlabel.errors import ModelError, VlmlabelError
from vlmlabel.model import CONFIG_FILE as OPEN_CLIP_CONFIG
from vlmlabel.model import file_sha256
from vlmlabel.queries import DEFAULT_ANSWER, GOAL_FIELD

try:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    from transformers.utils import logging as transformers_logging

    _TRANSFORMERS = True
except ImportError:  # the optional extra is not installed: describe_judge says how to install it
    _TRANSFORMERS = False

INSTALL_HINT = "--scorer vlm needs transformers: pip install 'vlmlabel[vlm]'"
DEFAULT_FPS = 2.0  # frames per second told to video models when the dataset does not say (Qwen's own default)
VIDEO_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})
# A batch's default size: this many input tokens (all queries together). An estimate, not measured: at 32768
# tokens a 7-8B model's largest bf16 activations (hidden 4096, MLP 12288 wide) are a few GiB, beside its weights
# on a 40-80 GB GPU (no KV cache is kept: use_cache=False); on a CPU, larger batches gain nothing.
GPU_TOKEN_BUDGET = 32768
CPU_TOKEN_BUDGET = 8192
CONFIG_FILE = "config.json"
# The files that name a model besides its weights (*.safetensors, *.bin): config, processor, tokenizer, template.
IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
IDENTITY_SUFFIXES = (".jinja", ".index.json")  # chat templates; the index of sharded weights


_TASK = "The robot's task is: {goal}\n"
_TRUE_OR_FALSE = "Is the task complete in these frames? Answer True or False."

# --- readouts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogProb:
    """log P(answer) at the next token."""

    answer: str

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer,)

    def value(self, logp: torch.Tensor) -> torch.Tensor:
        """(B, 1) fp32 log-probabilities of ``answers`` -> (B,) readouts."""
        return logp[:, 0]

    def describe(self) -> dict[str, Any]:
        return {"readout": "logprob", "answer": self.answer}

    def default_prompt(self) -> str:
        return _TASK + _TRUE_OR_FALSE


@dataclass(frozen=True)
class Ratio:
    """P(answer) / (P(answer) + P(versus)) at the next token."""

    answer: str
    versus: str

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, self.versus)

    def value(self, logp: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logp[:, 0] - logp[:, 1])  # p_a / (p_a + p_v), without exp() underflowing

    def describe(self) -> dict[str, Any]:
        return {"readout": "ratio", "answer": self.answer, "versus": self.versus}

    def default_prompt(self) -> str:
        return _TASK + _TRUE_OR_FALSE


@dataclass(frozen=True)
class Expected:
    """sum(v_i p_i) / sum(p_i) over the listed answers' probabilities at the next token."""

    values: tuple[tuple[str, float], ...]

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(answer for answer, _ in self.values)

    def value(self, logp: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor([v for _, v in self.values], dtype=logp.dtype, device=logp.device)
        return torch.softmax(logp, dim=-1) @ weights  # softmax of log p over the subset: p_i / sum(p_i)

    def describe(self) -> dict[str, Any]:
        return {"readout": "expected", "answer_values": [[a, v] for a, v in self.values]}

    def default_prompt(self) -> str:
        listed = ", ".join(answer.strip() for answer in self.answers)
        return _TASK + f"How far along is the task in these frames? Answer with one of {listed}."


Readout = LogProb | Ratio | Expected


def parse_readout(answer: str | None, versus: str | None, answer_values: str | None) -> Readout:
    """The readout the options name: ``--answer-values`` alone -> Expected; ``--versus`` -> Ratio (its answer
    defaults to "True"); else LogProb (default "True": TOPReward's " True", read after the chat template's
    generation prompt, which ends a line)."""
    if answer_values is not None:
        if answer is not None or versus is not None:
            raise VlmlabelError("--answer-values cannot be combined with --answer or --versus; give one readout")
        return Expected(_parse_values(answer_values))
    answer = DEFAULT_ANSWER if answer is None else answer
    if not answer:
        raise VlmlabelError("--answer is empty; give the answer whose probability is read, e.g. ' True'")
    if versus is None:
        return LogProb(answer)
    if not versus or versus == answer:
        raise VlmlabelError(f"--versus {versus!r} must be another answer than --answer {answer!r}, e.g. ' False'")
    return Ratio(answer, versus)


def _parse_values(text: str) -> tuple[tuple[str, float], ...]:
    """'1=0,2=0.25,3=0.5' -> (("1", 0.0), ("2", 0.25), ("3", 0.5)); answers kept as written (spaces count)."""
    example = "write ANSWER=VALUE pairs separated by commas, e.g. '1=0,2=0.25,3=0.5,4=0.75,5=1'"
    pairs: list[tuple[str, float]] = []
    for item in text.split(","):
        answer, sep, number = item.rpartition("=")
        if not sep or not answer:
            raise VlmlabelError(f"--answer-values {text!r}: {item!r} is not ANSWER=VALUE; {example}")
        try:
            value = float(number)
        except ValueError:
            raise VlmlabelError(f"--answer-values {text!r}: {number!r} is not a number; {example}") from None
        if not math.isfinite(value):
            raise VlmlabelError(f"--answer-values {text!r}: {number!r} is not a finite number; {example}")
        if answer in (a for a, _ in pairs):
            raise VlmlabelError(f"--answer-values {text!r}: answer {answer!r} is given twice; {example}")
        pairs.append((answer, value))
    if len(pairs) < 2:
        raise VlmlabelError(f"--answer-values {text!r} names one answer; an expected value needs two or more")
    return tuple(pairs)


def default_prompt(readout: Readout) -> str:
    """The prompt each readout is asked with unless ``--prompt`` says otherwise (it holds ``{goal}``)."""
    return readout.default_prompt()


def check_prompt(prompt: str) -> str:
    """The prompt, once it is known to hold the ``{goal}`` placeholder (filled in per query)."""
    if GOAL_FIELD not in prompt:
        raise VlmlabelError(
            f"--prompt {prompt!r} has no {GOAL_FIELD} placeholder; write where the goal goes, e.g. 'Task: {GOAL_FIELD}'"
        )
    return prompt


# --- the model's card -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeCard:
    """Everything that names the model, with no weight loaded: its folder, family (config.model_type), the sha256
    of its weights, config, processor, tokenizer and chat template files, and whether its frames go as video."""

    name: str
    path: Path
    family: str
    files: tuple[tuple[str, str], ...]  # (file name, sha256), sorted by name
    takes_video: bool

    def describe(self) -> dict[str, Any]:
        """JSON-able, without the folder (moved files are the same model): for provenance and the result id."""
        return {
            "model": self.name,
            "family": self.family,
            "model_files_sha256": dict(self.files),
            "takes_video": self.takes_video,
        }


def describe_judge(model: str) -> JudgeCard:
    """The card of ``model``: a local folder, or a Hub id found in the local Hugging Face cache (never the
    network). Refused in one line: transformers missing, no such model, remote code needed, no vision tower."""
    if not _TRANSFORMERS:
        raise ModelError(INSTALL_HINT)
    path = _model_folder(model)
    config = _read_json(path / CONFIG_FILE, model)
    family = str(config.get("model_type") or "")
    _refuse_remote_code(model, path, config, family)
    if "vision_config" not in config or family not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelError(
            f"model {model!r} ({family}) has no vision tower: it is not an image-text-to-text model; "
            "give a vision-language model (e.g. Qwen3-VL, SmolVLM)"
        )
    files = tuple((name, file_sha256(path / name)) for name in _identity_files(path))
    return JudgeCard(model, path, family, files, family in VIDEO_FAMILIES)


def _model_folder(model: str) -> Path:
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file():
            clip = " (an open_clip folder: --scorer clip)" if (folder / OPEN_CLIP_CONFIG).is_file() else ""
            raise ModelError(f"model folder {model!r} has no {CONFIG_FILE}; give a Hugging Face model folder{clip}")
        return folder.resolve()
    from huggingface_hub import snapshot_download  # a dependency of vlmlabel; the Hub is only read offline here

    try:
        return Path(str(snapshot_download(model, local_files_only=True)))
    except Exception:  # not a repo id, or not in the cache: both mean the same to the user
        raise ModelError(
            f"model {model!r} is neither a folder nor a Hub id in the local Hugging Face cache; give a model "
            f"folder, or download it first on a connected machine (hf download {model})"
        ) from None


def _read_json(path: Path, model: str) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model!r}: cannot read {path.name}: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ModelError(f"model {model!r}: {path.name} is not a JSON object")
    return loaded


def _refuse_remote_code(model: str, path: Path, config: dict[str, Any], family: str) -> None:
    """A model whose code is not in transformers (``auto_map`` in any of its JSON files, or a model type
    transformers does not know) would need trust_remote_code, which vlmlabel never passes."""
    mapped = [name for name in _identity_files(path) if name.endswith(".json") and _has_auto_map(path / name)]
    if mapped or family not in CONFIG_MAPPING_NAMES:
        unknown = f"transformers does not know model type {family!r}"
        why = f"{mapped[0]} maps its classes to the model's own code" if mapped else unknown
        raise ModelError(
            f"model {model!r} needs remote code ({why}); vlmlabel never runs a model's "
            "own code: give a model transformers supports natively"
        )


def _has_auto_map(path: Path) -> bool:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(loaded, dict) and "auto_map" in loaded


def _identity_files(path: Path) -> list[str]:
    names = {p.name for p in path.iterdir() if p.is_file()}
    return sorted(n for n in names if n in IDENTITY_FILES or n.endswith(WEIGHT_SUFFIXES + IDENTITY_SUFFIXES))


# --- queries and the loaded judge -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """What one readout shows the model: K >= 1 RGB frames (K, H, W, 3) uint8, oldest first, and the goal."""

    frames: np.ndarray
    goal: str
    # the rate of these frames as given (video metadata): the dataset's fps, divided by the spacing of frames
    # taken s steps apart; None: DEFAULT_FPS
    fps: float | None = None


class Judge:
    """A loaded model, processor and readout: ``readouts`` scores a batch of queries in one forward."""

    def __init__(
        self,
        card: JudgeCard,
        readout: Readout,
        prompt: str,
        device: torch.device,
        precision: str,
        model: Any,
        processor: Any,
        answer_ids: tuple[int, ...],
    ):
        self.card = card
        self.readout = readout
        self.prompt = prompt
        self.device = device
        self.precision = precision
        self.model = model
        self.processor = processor
        self.answer_ids = answer_ids
        # M-RoPE models (Qwen) place their tokens themselves from the attention mask; the others take positions
        self._positions_from_mask = not hasattr(getattr(model, "model", model), "get_rope_index")

    def as_video(self, query: Query) -> bool:
        """Whether the query's frames go to the processor as one video (else as images)."""
        return self.card.takes_video and len(query.frames) > 1

    def inputs(self, queries: Sequence[Query]) -> Any:
        """The processor's batch for ``queries``: left-padded ids and mask, pixels, and (videos) fps metadata."""
        texts = [self._text(query) for query in queries]
        images = [frame for query in queries if not self.as_video(query) for frame in _frames(query)]
        videos = [_frames(query) for query in queries if self.as_video(query)]
        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [np.stack(frames) for frames in videos]
            kwargs["video_metadata"] = [_metadata(query) for query in queries if self.as_video(query)]
            kwargs["do_sample_frames"] = False
        self.processor.tokenizer.padding_side = "left"
        return self.processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)

    def _text(self, query: Query) -> str:
        if query.frames.ndim != 4 or query.frames.shape[0] < 1 or query.frames.shape[-1] != 3:
            raise VlmlabelError(f"a query needs frames (K, H, W, 3) with K >= 1, not {tuple(query.frames.shape)}")
        shown = [{"type": "video"}] if self.as_video(query) else [{"type": "image"}] * len(query.frames)
        content = [*shown, {"type": "text", "text": self.prompt.replace(GOAL_FIELD, query.goal)}]
        messages = [{"role": "user", "content": content}]
        return str(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def readouts(self, queries: Sequence[Query]) -> np.ndarray:
        """(len(queries),) float32: each query's readout, all in one forward."""
        if not queries:
            return np.zeros(0, dtype=np.float32)
        return self.readouts_of(self.inputs(queries))

    def readouts_of(self, batch: Any) -> np.ndarray:
        """The readouts of a batch ``inputs`` made (which a reader can prepare while the model runs)."""
        batch = batch.to(self.device)
        mask = batch["attention_mask"]
        length = mask.shape[1]
        # each row's last real token (with left padding, the last column); only those positions get logits
        last = length - 1 - torch.argmax(mask.flip(-1).int(), dim=-1)
        keep, row_of = torch.unique(last, return_inverse=True)
        extra: dict[str, Any] = {}
        if self._positions_from_mask:
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        pixels = {k: v.to(self._dtype) if _floating(v) else v for k, v in batch.items()}
        dtype = autocast_dtype(self.precision)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            out = self.model(**pixels, **extra, use_cache=False, logits_to_keep=keep)
        logits = out.logits[torch.arange(len(last), device=last.device), row_of]
        logp = torch.log_softmax(logits.float(), dim=-1)[:, list(self.answer_ids)]
        return self.readout.value(logp).cpu().numpy().astype(np.float32)

    @property
    def _dtype(self) -> torch.dtype:
        return autocast_dtype(self.precision) or torch.float32

    def query_tokens(self, query: Query) -> int:
        """The input length of ``query`` alone, in tokens (frames included)."""
        return int(self.inputs([query])["input_ids"].shape[1])

    def default_batch_size(self, sample: Query) -> int:
        """Queries per batch: the token budget (``GPU_TOKEN_BUDGET`` on CUDA, else ``CPU_TOKEN_BUDGET``) over
        ``sample``'s length, at least one."""
        budget = GPU_TOKEN_BUDGET if self.device.type == "cuda" else CPU_TOKEN_BUDGET
        return max(1, budget // self.query_tokens(sample))

    def describe(self) -> dict[str, Any]:
        """The card, prompt, readout, precision and how frames are sent: what a written reward records."""
        frames = f"video (fps from the dataset, else {DEFAULT_FPS}) when K > 1, else images"
        return {
            **self.card.describe(),
            "prompt": self.prompt,
            **self.readout.describe(),
            "precision": self.precision,
            "frames": frames if self.card.takes_video else "images",
        }


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _frames(query: Query) -> list[np.ndarray]:
    return [np.ascontiguousarray(frame, dtype=np.uint8) for frame in query.frames]


def _metadata(query: Query) -> dict[str, Any]:
    count = len(query.frames)
    fps = DEFAULT_FPS if query.fps is None else float(query.fps)
    return {"total_num_frames": count, "fps": fps, "frames_indices": list(range(count))}


def load_judge(card: JudgeCard, readout: Readout, prompt: str, device: torch.device, precision: str) -> Judge:
    """The model and processor ``card`` names, in eval mode on ``device`` (never remote code, never the
    network); refuses an answer that is not one token, naming its tokens."""
    if not _TRANSFORMERS:
        raise ModelError(INSTALL_HINT)
    precision = resolve_precision(precision, device)
    prompt = check_prompt(prompt)
    processor = _load_processor(card)  # the answers are checked before any weight loads
    answer_ids = tuple(_one_token(processor.tokenizer, answer) for answer in readout.answers)
    if processor.tokenizer.pad_token is None:  # padding only fills masked positions: any token will do
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    video = getattr(processor, "video_processor", None)
    if video is not None and getattr(video, "cap_pixels_per_frame", False) is None:
        video.cap_pixels_per_frame = False  # what None does (transformers 5.x warns that a later default differs)
    model = _load_model(card, dtype=autocast_dtype(precision) or torch.float32)
    model.eval().to(device)
    return Judge(card, readout, prompt, device, precision, model, processor, answer_ids)


def _load_processor(card: JudgeCard) -> Any:
    try:
        processor = AutoProcessor.from_pretrained(card.path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"model {card.name!r}: cannot load its processor: {_first_line(exc)}") from None
    if getattr(processor, "chat_template", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ModelError(
            f"model {card.name!r} has no chat template (chat_template.jinja) or no tokenizer in its processor; "
            "give an instruction-tuned (chat) vision-language model"
        )
    return processor


def _load_model(card: JudgeCard, dtype: torch.dtype) -> Any:
    try:
        with _no_progress_bars():
            return AutoModelForImageTextToText.from_pretrained(
                card.path, dtype=dtype, local_files_only=True, trust_remote_code=False
            )
    except Exception as exc:
        raise ModelError(f"model {card.name!r}: cannot load its weights: {_first_line(exc)}") from None


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' loading bars off (the run shows its own progress), as they were afterwards."""
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def _one_token(tokenizer: Any, answer: str) -> int:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = ", ".join(json.dumps(tokenizer.decode([i])) for i in ids)
        raise VlmlabelError(
            f"answer {json.dumps(answer)} is {len(ids)} tokens ({pieces}); use an answer that is one token"
        )
    return int(ids[0])


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]

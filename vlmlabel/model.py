"""The one door to a CLIP model: resolve a name and weights, load them, encode images and texts.

This is the only module that imports open_clip. The loaded model carries its own
preprocessing config (size, mean, std, resize mode) so that weights and normalisation
can never drift apart: ``preprocess.py`` builds its transform from ``ClipModel.preprocess``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from vlmlabel.device import autocast_dtype
from vlmlabel.errors import ModelError
from vlmlabel.metadata import JsonObject

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_TAG = "laion2b_s34b_b79k"
RANDOM_WEIGHTS = "random"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
HASH_CHUNK = 1 << 20
_UNCUT_CONTEXT = 4096
_OFFLINE_HELP = (
    "give a local checkpoint with --pretrained FILE, a folder with --model local-dir:PATH, "
    "or pre-fill the Hugging Face cache on a connected machine and set HF_HUB_OFFLINE=1"
)


def _open_clip():
    # Imported lazily so `vlmlabel --help` and `inspect` stay fast.
    import open_clip

    return open_clip


@dataclass(frozen=True)
class PreprocessConfig:
    """The model's own image preprocessing, as open_clip's eval transform applies it."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size[-2:])
        # mean and std are per RGB channel: three numbers, or one for all three
        as3 = lambda v: cast(
            tuple[float, float, float],  # noqa: E731
            tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else (v,) * 3)),
        )
        return cls(
            size=size,
            mean=as3(cfg["mean"]),
            std=as3(cfg["std"]),
            # open_clip treats 'random' as bicubic at eval time.
            interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
            fill_color=int(cfg.get("fill_color") or 0),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }


class ClipModule(Protocol):
    """What vlmlabel uses of an open_clip model (``open_clip.CLIP`` or ``CustomTextCLIP``, both torch modules)."""

    visual: torch.nn.Module
    logit_scale: torch.Tensor

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ClipModel:
    """A loaded CLIP model on its device, with everything needed to score frames."""

    module: ClipModule
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    name: str
    pretrained: str
    preprocess: PreprocessConfig
    device: torch.device
    precision: str
    # Which weights these are: for local files their absolute path and sha256, for the Hub the repo and revision.
    identity: dict[str, Any] = field(default_factory=dict)
    has_image_tower: bool = True  # False: loaded to encode texts only (a relabel the embedding cache serves)

    @property
    def logit_scale(self) -> float:
        return float(self.module.logit_scale.exp().item())

    @property
    def logit_bias(self) -> float | None:
        """The bias a sigmoid-trained model (SigLIP) adds to its logits, as open_clip's ``get_logits`` does;
        None for models trained with the softmax loss (open_clip sets ``logit_bias`` to None, or has no such
        attribute)."""
        bias = getattr(self.module, "logit_bias", None)
        return None if bias is None else float(bias.item())

    def _autocast(self):
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm fp32 embeddings of preprocessed images (N, 3, H, W) already on the device."""
        with torch.inference_mode(), self._autocast():
            features = self.module.encode_image(pixels)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def compile_image_tower(self) -> None:
        """torch.compile the image tower: a slower start (compilation) for faster batches after it."""
        # torch.compile of a module returns a module (OptimizedModule); its stub types it as any callable
        self.module.visual = cast(torch.nn.Module, torch.compile(self.module.visual))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm fp32 embeddings of texts, one row per text."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), self._autocast():
            features = self.module.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @property
    def context_length(self) -> int | None:
        """How many tokens (start and end included) the text tower reads; longer texts are cut."""
        length = getattr(self.tokenizer, "context_length", None) or getattr(self.module, "context_length", None)
        return int(length) if length else None

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` with start and end, as the model's own tokenizer makes them, before any cut."""
        tokenizer: Any = self.tokenizer
        if callable(getattr(tokenizer, "encode", None)) and hasattr(tokenizer, "sot_token_id"):
            return len(tokenizer.encode(text)) + 2  # open_clip's SimpleTokenizer: exact, no padding to guess
        # Any other tokenizer (Hugging Face ones): tokenize with a context long enough to cut nothing and count
        # up to the last position that is not padding.
        row = tokenizer([text], context_length=_UNCUT_CONTEXT)[0]
        used = torch.nonzero(row != row[-1])
        return int(used[-1].item()) + 2 if len(used) else 1

    def truncation(self, text: str) -> Truncation | None:
        """What the tokenizer cuts off ``text`` (None when it fits the context)."""
        context = self.context_length
        if context is None:
            return None
        count = self.token_count(text)
        if count <= context:
            return None
        words = text.split()
        low, high = 0, len(words)  # the most whole words that fit: low fits, high + 1 does not
        while low < high:
            middle = (low + high + 1) // 2
            if self.token_count(" ".join(words[:middle])) <= context:
                low = middle
            else:
                high = middle - 1
        return Truncation(text, count, context, " ".join(words[:low]), " ".join(words[low:]))

    def reference_transform(self) -> Callable:
        """open_clip's own PIL transform for this model: the reference the fast path must match."""
        oc = _open_clip()
        cfg = oc.transform.PreprocessCfg(**{**self.preprocess.as_dict(), "size": self.preprocess.size})
        return oc.transform.image_transform_v2(cfg, is_train=False)

    def describe(self) -> dict[str, Any]:
        """What a written reward records about the model that made it."""
        return _describe(self.name, self.pretrained, self.precision, self.preprocess, self.identity)

    def weights_identity(self) -> str:
        """The identity without where the files are: what an embedding cache must match (moved weights are the
        same weights; other weights at the same path are not)."""
        return _weights_identity(self.identity)


def _describe(
    name: str, pretrained: str, precision: str, preprocess: PreprocessConfig, identity: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": name,
        "pretrained": pretrained,
        "precision": precision,
        "preprocess": json.dumps(preprocess.as_dict()),
        "model_identity": json.dumps(identity, sort_keys=True),
    }


def _weights_identity(identity: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in identity.items() if k != "path"}, sort_keys=True)


class Described(Protocol):
    """What is known of a model before and after it loads: a ``ModelCard`` or a ``ClipModel``."""

    def describe(self) -> dict[str, Any]: ...

    def weights_identity(self) -> str: ...


@dataclass(frozen=True)
class ModelCard:
    """A model known before any weight loads: its name, weights, precision, preprocessing and the weights'
    identity (local files hashed once, here). ``describe`` equals the loaded ``ClipModel.describe``, so a run
    can name its result, and match an embedding cache, before it decides to load anything."""

    name: str
    pretrained: str
    precision: str
    preprocess: PreprocessConfig
    identity: dict[str, Any]
    resolved: _Resolved

    def describe(self) -> dict[str, Any]:
        return _describe(self.name, self.pretrained, self.precision, self.preprocess, self.identity)

    def weights_identity(self) -> str:
        return _weights_identity(self.identity)


@dataclass(frozen=True)
class Truncation:
    """A text longer than the model's context: what the model reads of it and what it never sees."""

    text: str
    tokens: int  # start and end tokens included
    context: int
    kept: str  # the whole words that fit
    dropped: str  # the rest (a word cut in the middle is counted as dropped)

    def describe(self, what: str) -> str:
        return (
            f"{what} {self.text!r} is {self.tokens} tokens, longer than the model's context of {self.context}: "
            f"it reads only {self.kept!r} and drops {self.dropped!r}"
        )


@dataclass(frozen=True)
class _Resolved:
    open_clip_name: str
    weights: str | None
    force_preprocess: dict[str, Any] | None
    pretrained_label: str
    identity: dict[str, Any] = field(default_factory=dict)  # which weights, before hashing
    hashed: tuple[Path, ...] = ()  # local files whose sha256 the identity records


def load_model(
    name: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    allow_random: bool = False,
    image_tower: bool = True,
    card: ModelCard | None = None,
) -> ClipModel:
    """Resolve ``name``/``pretrained`` as open_clip users write them and load the model, failing fast offline.

    ``image_tower=False`` loads what encodes texts only (text tower, logit scale, tokenizer, the preprocessing
    config and the weights' identity, all as a full load gives them): a relabel served by the embedding cache
    then skips building and loading the image tower. Architectures and checkpoints where that is not possible
    load whole. ``card``: the model as ``describe_model`` resolved it (its weights then are not hashed again).
    """
    device = torch.device(device)
    card = card or describe_model(name, pretrained, precision, allow_random)
    resolved = card.resolved
    oc = _open_clip()
    with _one_line_errors(name, resolved):
        module: Any = None
        if not image_tower:
            try:
                module = _text_only(oc, resolved)
            except Exception:  # a checkpoint the text-only load cannot take: the whole load says what is wrong
                module = None
        if module is None:
            module = oc.create_model(
                resolved.open_clip_name,
                pretrained=resolved.weights,
                force_preprocess_cfg=resolved.force_preprocess,
                require_pretrained=resolved.weights is not None,
                load_weights=resolved.weights is not None or resolved.open_clip_name.startswith(LOCAL_DIR),
            )
        tokenizer = oc.get_tokenizer(resolved.open_clip_name)
    module.eval().to(device)
    preprocess = PreprocessConfig.from_open_clip(oc.get_model_preprocess_cfg(module))
    return ClipModel(
        module=module,
        tokenizer=tokenizer,
        name=name,
        pretrained=resolved.pretrained_label,
        preprocess=preprocess,
        device=device,
        precision=precision,
        identity=dict(card.identity),
        has_image_tower=not isinstance(module.visual, NoImageTower),
    )


def describe_model(
    name: str = DEFAULT_MODEL, pretrained: str | None = None, precision: str = "fp32", allow_random: bool = False
) -> ModelCard:
    """The model's card without loading it: the names resolved as ``load_model`` resolves them, local weights
    hashed, and the preprocessing config read from the architecture built on the meta device (no memory, no
    weights), as open_clip sets it on a loaded model."""
    resolved = _resolve(name, pretrained, allow_random)
    oc = _open_clip()
    with _one_line_errors(name, resolved):
        module = _unloaded(oc, resolved)
    preprocess = PreprocessConfig.from_open_clip(oc.get_model_preprocess_cfg(module))
    identity = dict(resolved.identity)
    if resolved.hashed:
        identity["sha256"] = {path.name: file_sha256(path) for path in resolved.hashed}
    return ModelCard(name, resolved.pretrained_label, precision, preprocess, identity, resolved)


@contextlib.contextmanager
def _one_line_errors(name: str, resolved: _Resolved) -> Iterator[None]:
    """Building a model (``load_model``, ``describe_model``): open_clip, which logs every load step on the root
    logger, held to errors; a failure, which a user's checkpoint can meet in many ways, one line for them."""
    root = logging.getLogger()
    previous_level = root.level
    root.setLevel(max(previous_level, logging.ERROR))
    try:
        yield
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"could not load model {name!r} with weights {resolved.pretrained_label!r}: {first_line[:300]}"
        ) from exc
    finally:
        root.setLevel(previous_level)


def _architecture(oc: Any, resolved: _Resolved, **where: Any) -> torch.nn.Module:
    """open_clip's model for ``resolved``, built with no weights loaded (``where``: create_model's device)."""
    return oc.create_model(
        resolved.open_clip_name,
        force_preprocess_cfg=resolved.force_preprocess,
        load_weights=False,
        pretrained_text=False,
        **where,
    )


def _unloaded(oc: Any, resolved: _Resolved) -> torch.nn.Module:
    """The architecture without weights: on the meta device, or on the CPU where it cannot be built there."""
    build = functools.partial(_architecture, oc, resolved)
    try:
        with torch.device("meta"):
            return build(device="meta")
    except Exception:  # an architecture whose construction computes on its tensors
        return build()


class NoImageTower(torch.nn.Module):
    """Stands in for the image tower of a model loaded to encode texts only; it keeps the tower's input size,
    from which open_clip sets the preprocessing config, and refuses images."""

    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        if hasattr(tower, "image_size"):
            self.image_size = tower.image_size

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise ModelError("this model was loaded without its image tower (texts only); load it whole to encode images")


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


@contextlib.contextmanager
def _text_tower_build(oc: Any) -> Any:
    """While open_clip builds a CLIP: its image tower is built on the meta device (no memory, no random init)
    and replaced by a ``NoImageTower``, and ``torch.nn.init`` does nothing, since every weight the model keeps
    is then loaded from the checkpoint (``_text_only`` checks that none is missing)."""
    build = oc.model._build_vision_tower
    initialisers = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}

    def stand_in(*args: Any, **kwargs: Any) -> torch.nn.Module:
        with torch.device("meta"):
            return NoImageTower(build(*args, **kwargs))

    oc.model._build_vision_tower = stand_in
    for name in initialisers:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        oc.model._build_vision_tower = build
        for name, function in initialisers.items():
            setattr(torch.nn.init, name, function)


def _text_only(oc: Any, resolved: _Resolved) -> torch.nn.Module | None:
    """The model with a ``NoImageTower`` and every other weight loaded from the checkpoint, or None when this
    architecture or checkpoint does not allow it (the caller then loads the whole model)."""
    checkpoint = resolved.weights
    if resolved.open_clip_name.startswith(LOCAL_DIR):
        checkpoint = oc.factory._find_checkpoint_in_dir(Path(resolved.open_clip_name[len(LOCAL_DIR) :]))
    if checkpoint is None or Path(checkpoint).suffix in (".npz", ".npy"):
        return None  # random weights, or big_vision checkpoints, which open_clip loads tower by tower
    with _text_tower_build(oc):
        module = _architecture(oc, resolved)
    if not isinstance(getattr(module, "visual", None), NoImageTower):
        return None  # an architecture that builds its image tower another way (CoCa)
    missing, unexpected = oc.load_checkpoint(module, checkpoint, strict=False)
    if missing or any(not key.startswith("visual.") for key in unexpected):
        return None  # weights left uninitialised, or a checkpoint of another layout: the whole load judges it
    return module


def file_sha256(path: Path) -> str:
    """sha256 of a file read in 1 MiB chunks (weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_revision(path: str | Path) -> str | None:
    """The commit a Hugging Face cache file belongs to (``.../snapshots/COMMIT/FILE``), if it is one."""
    parts = Path(path).parts
    if "snapshots" in parts[:-1]:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        return parts[index + 1] if index + 1 < len(parts) - 1 else None
    return None


def _resolve(name: str, pretrained: str | None, allow_random: bool) -> _Resolved:
    if name.startswith(LOCAL_DIR) or (not name.startswith(HF_HUB) and os.path.isdir(name)):
        folder = name[len(LOCAL_DIR) :] if name.startswith(LOCAL_DIR) else name
        return _resolve_local_dir(Path(folder), pretrained)
    if name.startswith(HF_HUB):
        return _resolve_hf_hub(name[len(HF_HUB) :], pretrained)
    return _resolve_builtin(name, pretrained, allow_random)


def _resolve_local_dir(folder: Path, pretrained: str | None) -> _Resolved:
    if pretrained:
        raise ModelError(f"model folder {folder} carries its own weights; drop --pretrained {pretrained!r}")
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist; give a folder holding {CONFIG_FILE} and weights")
    if not (folder / CONFIG_FILE).is_file():
        judge = (
            "; a transformers model (config.json) is a judge: pass --scorer vlm"
            if (folder / "config.json").is_file()
            else ""
        )
        raise ModelError(f"model folder {folder} has no {CONFIG_FILE}; it is not an open_clip local-dir model{judge}")
    cfg = JsonObject.read(folder / CONFIG_FILE, "re-export the model with open_clip", ModelError)
    cfg.object("model_cfg", required=True)
    cfg.object("preprocess_cfg")
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise ModelError(
            f"model folder {folder} holds no weights (.safetensors/.bin/.pth); add "
            f"{WEIGHT_FILES[0]} beside {CONFIG_FILE}"
        )
    identity = {"source": "local folder", "path": str(folder.resolve())}
    return _Resolved(f"{LOCAL_DIR}{folder}", None, None, "bundled", identity, (folder / CONFIG_FILE, *weights))


def _resolve_hf_hub(repo_id: str, pretrained: str | None) -> _Resolved:
    if pretrained:
        raise ModelError(f"hf-hub:{repo_id} carries its own weights; drop --pretrained {pretrained!r}")
    config = _hub_file(repo_id, [CONFIG_FILE])
    weights = _hub_file(repo_id, list(WEIGHT_FILES))
    snapshot = Path(config).parent
    if Path(weights).parent != snapshot:
        raise ModelError(
            f"hf-hub:{repo_id}: config and weights come from different snapshots; clear the cache "
            "entry and download again"
        )
    identity = {"source": "hf-hub", "repo": repo_id, "revision": _hub_revision(weights), "file": Path(weights).name}
    return _Resolved(f"{LOCAL_DIR}{snapshot}", None, None, f"hf-hub:{repo_id}", identity)


def _resolve_builtin(name: str, pretrained: str | None, allow_random: bool) -> _Resolved:
    oc = _open_clip()
    known = oc.list_models()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise ModelError(
            f"unknown model {name!r}; {hint}run `vlmlabel models` to list architectures, or give "
            "hf-hub:ORG/REPO or a local folder"
        )
    tags = oc.list_pretrained_tags_by_model(name)
    if pretrained is None:
        if name == DEFAULT_MODEL:
            pretrained = DEFAULT_TAG
        elif tags:
            pretrained = tags[0]
        else:
            raise ModelError(f"{name} has no pretrained tag in open_clip; give weights with --pretrained FILE")
    if pretrained == RANDOM_WEIGHTS:
        if not allow_random:
            raise ModelError("--pretrained random gives meaningless rewards; it is only accepted by `vlmlabel bench`")
        return _Resolved(name, None, None, RANDOM_WEIGHTS, {"source": "random", "architecture": name})
    if os.path.isfile(pretrained):
        local = {"source": "file", "architecture": name, "path": str(Path(pretrained).resolve())}
        return _Resolved(name, pretrained, None, pretrained, local, (Path(pretrained),))
    looks_like_path = os.sep in pretrained or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth"))
    if looks_like_path:
        raise ModelError(f"checkpoint file {pretrained} does not exist; give an existing .safetensors/.bin/.pt file")
    tag_cfg = oc.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        near = difflib.get_close_matches(pretrained, tags, n=4, cutoff=0.4)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        listed = ", ".join(tags) if tags else "none"
        raise ModelError(f"unknown pretrained tag {pretrained!r} for {name}; {hint}known tags: {listed}")
    weights = _tag_weights(name, pretrained, tag_cfg)
    preprocess_keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
    force = {k: tag_cfg[k] for k in preprocess_keys if k in tag_cfg}
    identity: dict[str, Any] = {
        "source": "open_clip tag",
        "architecture": name,
        "tag": pretrained,
        "repo": os.path.split(tag_cfg.get("hf_hub", ""))[0] or None,
        "url": tag_cfg.get("url") or None,
        "revision": _hub_revision(weights),
        "file": Path(weights).name,
    }
    return _Resolved(name, weights, force, pretrained, {k: v for k, v in identity.items() if v is not None})


def _tag_weights(name: str, tag: str, tag_cfg: dict[str, Any]) -> str:
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # 'org/repo/' names the repo's default weights file
        candidates = [filename] if filename else []
        if filename.endswith(".bin"):
            candidates.insert(0, filename[: -len(".bin")] + ".safetensors")
        candidates += [f for f in WEIGHT_FILES if f not in candidates]
        return _hub_file(repo_id, candidates, what=f"weights for {name} {tag}")
    url = tag_cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if cached.is_file():
        return str(cached)
    raise ModelError(f"weights for {name} {tag} are not in ~/.cache/clip; " + _OFFLINE_HELP)


def _hub_file(repo_id: str, filenames: list[str], what: str | None = None) -> str:
    """The first of ``filenames`` in the Hugging Face cache, else downloaded if the Hub answers within seconds."""
    # Imported here, where a model is fetched, to keep huggingface_hub off the CLI's start (this module is on it).
    import huggingface_hub as hf
    from huggingface_hub import constants

    what = what or f"{repo_id}/{filenames[0]}"
    for filename in filenames:
        cached = hf.try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return cached
    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"{what} ({repo_id}) are not in the local Hugging Face cache and HF_HUB_OFFLINE is set; " + _OFFLINE_HELP
        )
    for filename in filenames:
        try:
            hf.get_hf_file_metadata(hf.hf_hub_url(repo_id, filename), timeout=5)
        except hf.errors.EntryNotFoundError:
            continue
        except Exception as exc:  # any network failure: say so now, not after minutes of retries
            raise ModelError(
                f"{what} ({repo_id}) are not cached and the Hugging Face Hub is unreachable "
                f"({type(exc).__name__}); " + _OFFLINE_HELP
            ) from None
        return hf.hf_hub_download(repo_id, filename)
    raise ModelError(f"{repo_id} on the Hugging Face Hub has none of {', '.join(filenames)}")


def list_architectures() -> list[tuple[str, list[str]]]:
    """Every open_clip architecture with its pretrained tags."""
    oc = _open_clip()
    return [(name, oc.list_pretrained_tags_by_model(name)) for name in oc.list_models()]


def create_untrained(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP from an architecture dict (tests, training)."""
    return _open_clip().CLIP(**model_cfg)


def get_tokenizer(model_name: str) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's tokenizer for a model name (or local-dir:PATH)."""
    return _open_clip().get_tokenizer(model_name)


def save_local_dir(
    module: torch.nn.Module,
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any],
    folder: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write open_clip's local-dir layout: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file  # only to write a model (tests, tools): off the CLI's start

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n"
    )
    state = {
        k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in module.state_dict().items()
    }
    save_file(state, str(folder / WEIGHT_FILES[0]))
    return folder

"""Frames stored in Arrow columns: `Image` structs (encoded bytes, decoded later) or nested numeric lists.

Float frames are accepted when every value lies in [0, 1]; they become uint8 as ``round(x * 255)``,
which gives back exactly the uint8 image a float frame was made from by ``x / 255``. Any other range,
NaN, or integer type other than uint8 is refused with a message saying how to convert.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlmlabel.errors import SourceError
from vlmlabel.metadata import JsonObject
from vlmlabel.sources.base import FrameBlock, FrameFormat


def hf_features(schema: pa.Schema, where: object) -> dict[str, dict]:
    """The `datasets` features recorded in the schema's ``huggingface`` metadata ({} when absent), which must be
    an object whose ``info.features`` is an object (a labelled copy adds its columns there); ``where``: the file
    the schema is from. Only features described by an object are returned (a bare list is a sequence)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    meta = JsonObject.parse(
        raw,
        f"the 'huggingface' metadata of {where}",
        "the file's schema metadata is damaged: write the dataset again with `datasets`",
    )
    features = meta.object("info").object("features").values
    return {name: value for name, value in features.items() if isinstance(value, dict)}


def _storage_type(kind: pa.DataType) -> pa.DataType:
    return kind.storage_type if isinstance(kind, pa.ExtensionType) else kind


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _nesting(kind: pa.DataType) -> tuple[int, pa.DataType]:
    """Rank of a nested list type and its leaf type."""
    rank, kind = 0, _storage_type(kind)
    while _is_list(kind):
        rank, kind = rank + 1, _storage_type(kind.value_type)
    return rank, kind


def is_image_struct(field: pa.Field, feature: dict | None) -> bool:
    """An `Image` feature: struct{bytes, path} (with or without the `datasets` metadata)."""
    if feature and feature.get("_type") == "Image":
        return True
    kind = field.type
    return pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} == {"bytes", "path"}


def looks_like_frames(field: pa.Field, feature: dict | None) -> bool:
    """Image structs, or per-row arrays of rank 3 (HWC/CHW) or uint8 of rank 2 (grayscale)."""
    if is_image_struct(field, feature):
        return True
    rank, leaf = _nesting(field.type)
    numeric = pa.types.is_integer(leaf) or pa.types.is_floating(leaf)
    return numeric and (rank == 3 or (rank == 2 and pa.types.is_uint8(leaf)))


def _arrays(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


def _row_shape(column: pa.Array, rank: int, name: str) -> tuple[int, ...]:
    values, shape = column.slice(0, 1), []
    for _ in range(rank):
        values = values.storage if isinstance(values, pa.ExtensionArray) else values
        if values.null_count:
            raise SourceError(f"column {name!r} has an empty (null) frame; every row needs an image")
        shape.append(len(values.flatten()) // max(len(values), 1))
        values = values.flatten()
    return tuple(shape)


def frame_format(field: pa.Field, feature: dict | None, sample: pa.Array) -> FrameFormat:
    """How the frames of ``field`` are stored, checked on ``sample`` (its first rows)."""
    name = field.name
    if is_image_struct(field, feature):
        return FrameFormat("encoded", (), "Image")
    rank, leaf = _nesting(field.type)
    if not (pa.types.is_integer(leaf) or pa.types.is_floating(leaf)):
        raise SourceError(f"column {name!r} holds {field.type}, not images; choose an image column with --image-key")
    if rank not in (2, 3):
        raise SourceError(f"column {name!r} has rank {rank} per row; frames must be (H, W, C), (C, H, W) or (H, W)")
    dtype = leaf.to_pandas_dtype().__name__
    if not (pa.types.is_uint8(leaf) or pa.types.is_floating(leaf)):
        raise SourceError(
            f"column {name!r} holds {dtype} values; frames must be uint8 (0-255) or float in [0, 1]: "
            f"cast it, e.g. ds.cast_column({name!r}, Array3D(shape, 'uint8'))"
        )
    if len(sample) == 0:
        raise SourceError(f"column {name!r} has no rows")
    shape = _row_shape(sample, rank, name)
    if rank == 2:
        return FrameFormat("HW", shape, dtype)
    if shape[-1] in (1, 3):
        return FrameFormat("HWC", shape, dtype)
    if shape[0] in (1, 3):
        return FrameFormat("CHW", shape, dtype)
    raise SourceError(f"column {name!r} has frames of shape {shape}: frames need 1 or 3 channels, first or last")


def _nested_to_numpy(array: pa.Array, fmt: FrameFormat, name: str) -> np.ndarray:
    rows, values = len(array), array
    for level, size in enumerate(fmt.frame_shape):
        values = values.storage if isinstance(values, pa.ExtensionArray) else values
        if values.null_count:
            raise SourceError(f"column {name!r} has an empty (null) frame; every row needs an image")
        if not pa.types.is_fixed_size_list(values.type):
            lengths = pc.list_value_length(values)
            low, high = pc.min_max(lengths).values()
            if len(lengths) and (low.as_py() != size or high.as_py() != size):
                raise SourceError(
                    f"column {name!r} has frames of different shapes (axis {level} is {low}-{high}, "
                    f"expected {size}); all frames of one column must share a shape"
                )
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    return flat.reshape((rows, *fmt.frame_shape))


def _to_uint8(block: np.ndarray, name: str) -> np.ndarray:
    if block.dtype == np.uint8:
        return block  # a read-only view of Arrow memory: readers copy it into their batch buffer
    if not (np.all(block >= 0) and np.all(block <= 1)):  # also false for NaN
        low, high = np.nanmin(block), np.nanmax(block)
        raise SourceError(
            f"column {name!r} holds float frames outside [0, 1] (min {low:g}, max {high:g}"
            f"{', or NaN' if np.isnan(block).any() else ''}); vlmlabel reads float frames in [0, 1] "
            "or uint8 (0-255): rescale or cast the column"
        )
    return np.rint(block.astype(np.float32) * 255.0).astype(np.uint8)


def _image_bytes(struct: pa.Array, name: str, base: Path | None) -> list[np.ndarray]:
    """Each row's image bytes: views of the column's own buffer (no Python bytes object per row), or the
    file a row names where it holds a path instead."""
    names = [struct.type.field(i).name for i in range(struct.type.num_fields)]
    children = dict(zip(names, struct.flatten(), strict=True))
    data = children["bytes"]
    if not (pa.types.is_binary(data.type) or pa.types.is_large_binary(data.type)):
        data = data.cast(pa.large_binary())
    _, offset_buffer, value_buffer = data.buffers()
    width = np.int64 if pa.types.is_large_binary(data.type) else np.int32
    offsets = np.frombuffer(offset_buffer, dtype=width)[data.offset : data.offset + len(data) + 1]
    values = np.frombuffer(value_buffer, dtype=np.uint8) if value_buffer is not None else np.empty(0, np.uint8)
    paths = children["path"].to_pylist() if data.null_count else None
    blobs = []
    for row, (begin, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        if paths is not None and not data[row].is_valid:
            blobs.append(np.frombuffer(_read_image_file(paths[row], name, base), dtype=np.uint8))
        else:
            blobs.append(values[begin:end])
    return blobs


def _read_image_file(path: str | None, name: str, base: Path | None) -> bytes:
    if not path:
        raise SourceError(f"column {name!r} has a row without image bytes or path; every row needs an image")
    candidate = Path(path) if Path(path).is_absolute() or base is None else base / path
    try:
        return candidate.read_bytes()
    except OSError:
        raise SourceError(
            f"column {name!r} refers to image file {path!r}, which cannot be read; "
            "embed the images (datasets' embed_external_files) or fix the path"
        ) from None


def to_block(column: pa.Array | pa.ChunkedArray, fmt: FrameFormat, name: str, base: Path | None = None) -> FrameBlock:
    """Rows of an image column as a frame block: byte arrays (encoded) or a uint8 array."""
    parts = _arrays(column)
    if fmt.encoded:
        return [blob for part in parts for blob in _image_bytes(part, name, base)]
    arrays = [_nested_to_numpy(part, fmt, name) for part in parts if len(part)]
    block = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return _to_uint8(block, name)

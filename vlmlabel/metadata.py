"""JSON metadata read with its shape checked: whatever is wrong is refused in one line naming the file and field.

Datasets describe themselves in JSON (LeRobot's ``meta/info.json``, save_to_disk's ``state.json``, the
``huggingface`` key of an Arrow schema, a model folder's ``open_clip_config.json``). Valid JSON of the wrong shape
(a list where an object belongs, ``null`` for a list, a string for a number) used to fail somewhere later, as a
traceback and sometimes after every frame was scored. Readers now take such metadata only through ``JsonObject``,
asking each value with the type they need, when the dataset is opened: no reader indexes unchecked JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from vlmlabel.errors import SourceError, VlmlabelError

_REQUIRED: Any = object()
NULL = type(None)  # a kind: the value may be null
_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    NULL: "null",
}
Kind = type | tuple[type, ...]


def _matches(value: object, kind: Kind) -> bool:
    """JSON's view of types: true/false is not a number, and an integer is a number."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _kind_name(kind: Kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_NAMES[k] for k in kinds)


def describe(value: object) -> str:
    """What a JSON value is, for a message: its type and, when short, the value itself."""
    name = _NAMES.get(type(value), type(value).__name__)
    if value is None:
        return name
    shown = json.dumps(value)
    return f"{name} ({shown})" if len(shown) <= 40 else name


@dataclass(frozen=True)
class JsonObject:
    """A JSON object read from ``where`` (a file, or a field of one), handing out values of the types asked."""

    values: dict[str, Any]
    where: str  # the file (and the fields leading here), as messages name it
    advice: str = ""  # what to do about a refusal, appended to it
    error: type[VlmlabelError] = SourceError

    @classmethod
    def read(cls, path: Path, advice: str = "", error: type[VlmlabelError] = SourceError) -> JsonObject:
        """The object in the file at ``path``; a missing or unreadable file, invalid JSON or another value than an
        object is refused."""
        try:
            value = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise error(f"{path} cannot be read ({exc}){_then(advice)}") from None
        return cls.of(value, str(path), advice, error)

    @classmethod
    def parse(
        cls, text: str | bytes, where: str, advice: str = "", error: type[VlmlabelError] = SourceError
    ) -> JsonObject:
        """The object in the JSON text ``text`` found at ``where``."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise error(f"{where} is not valid JSON ({exc}){_then(advice)}") from None
        return cls.of(value, where, advice, error)

    @classmethod
    def of(cls, value: object, where: str, advice: str = "", error: type[VlmlabelError] = SourceError) -> JsonObject:
        if not isinstance(value, dict):
            raise error(f"{where} holds {describe(value)}, not a JSON object{_then(advice)}")
        return cls(value, where, advice, error)

    def refuse(self, problem: str) -> NoReturn:
        raise self.error(f"{self.where}: {problem}{_then(self.advice)}")

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def get(self, key: str, kind: Kind, default: Any = _REQUIRED) -> Any:
        """``key``'s value, which must be of ``kind`` (``NULL`` among the kinds allows null); ``default`` when the key
        is absent, which without a default is refused too."""
        if key not in self.values:
            if default is _REQUIRED:
                self.refuse(f"{key!r} is missing")
            return default
        value = self.values[key]
        if not _matches(value, kind):
            self.refuse(f"{key!r} is {describe(value)}, not {_kind_name(kind)}")
        return value

    def list_of(self, key: str, kind: Kind, default: Any = _REQUIRED) -> list[Any]:
        """``key``'s value: a list whose every item is of ``kind``."""
        values = self.get(key, list, default)
        for index, value in enumerate(values):
            if not _matches(value, kind):
                self.refuse(f"{key!r}[{index}] is {describe(value)}, not {_kind_name(kind)}")
        return values

    def object(self, key: str, required: bool = False) -> JsonObject:
        """The object under ``key`` (an empty one when the key is absent and not ``required``)."""
        value = self.get(key, dict, _REQUIRED if required else {})
        return JsonObject(value, f"{self.where}[{key!r}]", self.advice, self.error)

    def objects(self, key: str, default: Any = _REQUIRED) -> list[JsonObject]:
        """``key``'s value: a list of objects."""
        values = self.list_of(key, dict, default)
        return [JsonObject(v, f"{self.where}[{key!r}][{i}]", self.advice, self.error) for i, v in enumerate(values)]

    def entries(self) -> dict[str, JsonObject]:
        """Every value of this object, each of which must be an object itself (a table of named entries)."""
        return {key: self.object(key, required=True) for key in self.values}


def _then(advice: str) -> str:
    return f"; {advice}" if advice else ""

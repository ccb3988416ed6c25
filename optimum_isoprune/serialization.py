"""`save_pretrained` / `from_pretrained` for the small JSON documents written beside a checkpoint."""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="JsonFile")


class JsonFile:
    """Mixin for dataclasses with `to_dict` / `from_dict`, stored as `file_name` in a directory."""

    file_name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        raise NotImplementedError

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `file_name` into `save_directory` and return its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.file_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls: type[T], path: str | os.PathLike) -> T:
        """Read from a directory holding `file_name`, or from the JSON file itself."""
        file = os.path.join(path, cls.file_name) if os.path.isdir(path) else str(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No {cls.file_name} found at {path!s}.")
        with open(file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file} is not valid JSON ({error}); save it again or restore it.") from error
        return cls.from_dict(data)

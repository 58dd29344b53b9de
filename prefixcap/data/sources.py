"""Dataset sources for a user's own data: JSON Lines files of image paths and captions, or any `datasets` set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefixcap.data import HFOptions, JsonlOptions
from prefixcap.errors import PrefixcapError, summary
from prefixcap.interfaces import DatasetSource, Example


class DatasetError(PrefixcapError):
    """A dataset file is missing or malformed."""


class JsonlSource(DatasetSource):
    """One file per split; each line ``{"image": "path", "captions": ["...", ...]}`` (or one caption as a string).

    Image paths are relative to the file's directory. A missing or broken image is not an error here: the trainer
    skips and counts it, so one bad file never costs a run.
    """

    def __init__(self, options: JsonlOptions):
        self.options = options

    def examples(self, split: str) -> Iterator[Example]:
        path = getattr(self.options, split, None)
        if path is None:
            return
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: cannot read the {split} split: {e}") from None
        image_key, caption_key = self.options.image_field, self.options.caption_field
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, captions = row[image_key], row[caption_key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(f"{path}:{number}: expected a JSON object with {image_key!r} and "
                                   f"{caption_key!r} ({type(e).__name__}: {e})") from None  # fmt: skip
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DatasetError(f"{path}:{number}: {caption_key!r} must be a string or a list of strings")
            yield Example(image=path.parent / image, captions=captions)


class HFSource(DatasetSource):
    """A Hugging Face ``datasets`` dataset: a hub id, a directory written by ``save_to_disk``, or an image folder
    (images plus a metadata.jsonl/csv with the caption column). Images decode to PIL; a caption column may hold one
    caption or a list of references. ``streaming`` reads hub data lazily instead of downloading it first."""

    def __init__(self, options: HFOptions):
        self.options = options
        self._data: Any = None

    def _load(self) -> Any:
        import datasets

        o, path = self.options, Path(self.options.path)
        try:
            if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
                return datasets.load_from_disk(str(path))
            if path.is_dir():
                return datasets.load_dataset("imagefolder", data_dir=str(path), streaming=o.streaming)
            return datasets.load_dataset(o.path, o.config, revision=o.revision, streaming=o.streaming)
        except Exception as e:  # datasets raises many types for "not found" / "offline" / "bad files"
            raise DatasetError(f"cannot load dataset {o.path!r}: {summary(e)}") from None

    def examples(self, split: str) -> Iterator[Example]:
        name = getattr(self.options, split, None)
        if name is None:
            return
        if self._data is None:
            self._data = self._load()
        data = self._data
        if hasattr(data, "keys"):  # a DatasetDict: pick the split
            if name not in data:
                raise DatasetError(f"dataset {self.options.path!r} has no split {name!r} (it has: "
                                   f"{', '.join(data.keys())}); set data.{split}")  # fmt: skip
            data = data[name]
        o = self.options
        # Flickr8k-style sets keep each reference in its own column (caption_0 ... caption_4).
        columns = [o.caption_column] if isinstance(o.caption_column, str) else o.caption_column
        for row in data:
            missing = [c for c in (o.image_column, *columns) if c not in row]
            if missing:
                raise DatasetError(f"dataset {o.path!r} split {name!r}: rows have no column {', '.join(missing)}; "
                                   f"found {', '.join(row)} (set data.image_column / data.caption_column)")  # fmt: skip
            captions = []
            for column in columns:
                value = row[column]
                captions += [value] if isinstance(value, str) else list(value or [])
            yield Example(image=row[o.image_column], captions=[c for c in captions if isinstance(c, str)])

"""Dataset sources for a user's own data: JSON Lines files of image paths and captions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from prefixcap.data import JsonlOptions
from prefixcap.errors import PrefixcapError
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

"""Dataset sources for a user's own data: JSON Lines files of image paths and captions, or any `datasets` set."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefixcap.checkpoints import dataset_snapshot, hub_cache, hub_dataset_found, hub_id, offline_setting
from prefixcap.data import HFOptions, JsonlOptions
from prefixcap.errors import PrefixcapError, summary
from prefixcap.data.rows import FORMAT, ArrowRows, prefixcap_cache, quiet_datasets, row_captions, spool
from prefixcap.interfaces import DatasetSource, Example, Rows


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
        rows = self.rows(split)
        for i in range(len(rows) if rows is not None else 0):
            yield Example(image=Path(rows.image(i)), captions=rows.captions(i))

    def rows(self, split: str) -> ArrowRows | None:
        """The file as an Arrow table of (image path, captions), written once to prefixcap's cache and memory-mapped
        from then on; a file changed since (size or modification time) is read again."""
        import datasets

        path = getattr(self.options, split, None)
        if path is None:
            return None
        path = Path(path).absolute()
        try:
            st = path.stat()
        except OSError as e:
            raise DatasetError(f"{path}: cannot read the {split} split: {e.strerror or e}") from None
        o = self.options
        fingerprint = hashlib.sha256(f"{FORMAT}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{o.image_field}\0"
                                     f"{o.caption_field}".encode()).hexdigest()[:32]  # fmt: skip
        features = datasets.Features({"image": datasets.Value("string"),
                                      "captions": datasets.Sequence(datasets.Value("string"))})  # fmt: skip
        try:
            with quiet_datasets():
                data = datasets.Dataset.from_generator(
                    _jsonl_rows, features=features, cache_dir=str(prefixcap_cache() / "datasets"),
                    fingerprint=fingerprint, gen_kwargs={"path": str(path), "split": split,
                                                         "image_key": o.image_field, "caption_key": o.caption_field})
        except datasets.exceptions.DatasetGenerationError as e:
            raise (e.__cause__ if isinstance(e.__cause__, DatasetError) else DatasetError(summary(e))) from None
        return ArrowRows(data, "image", ["captions"])


def _jsonl_rows(path: str, split: str, image_key: str, caption_key: str) -> Iterator[dict[str, Any]]:
    """Rows of a JSON Lines file, checked line by line (a bad line is named by its number), streamed from disk."""
    file = Path(path)
    try:
        with file.open(encoding="utf-8") as lines:
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
                if not isinstance(image, str):
                    raise DatasetError(f"{path}:{number}: {image_key!r} must be a path (a string)")
                yield {"image": str(file.parent / image), "captions": captions}
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the {split} split: {e}") from None


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
            try:
                return datasets.load_dataset(o.path, o.config, revision=o.revision, streaming=o.streaming)
            except ConnectionError:  # offline, or the hub unreachable: datasets then looks only in its own cache
                snapshot = dataset_snapshot(o.path, o.revision) if hub_id(o.path) else None
                if snapshot is None:
                    raise
            # what `hf download --repo-type dataset` put in the hub cache, read as the local folder it is
            return datasets.load_dataset(str(snapshot), o.config, streaming=o.streaming)
        except Exception as e:  # datasets raises many types for "not found" / "offline" / "bad files"
            raise DatasetError(f"cannot load dataset {o.path!r}: {self._why(e)}") from None

    def _why(self, error: Exception) -> str:
        """datasets' reason, or for a hub set that is neither in a cache nor reachable, the command that gets it."""
        o = self.options
        if not isinstance(error, ConnectionError) or not hub_id(o.path):
            return summary(error)
        found = hub_dataset_found(o.path, o.revision)
        if found.status != "missing":
            return summary(error)
        offline = offline_setting()
        why = f"{offline} is set" if offline else "the hub cannot be reached"  # so nothing can be downloaded
        return f"{found.detail}; the Hugging Face cache is {hub_cache()}, and {why}: get it with `{found.fix}`"

    def _split(self, split: str) -> Any:
        name = getattr(self.options, split, None)
        if name is None:
            return None
        if self._data is None:
            self._data = self._load()
        data = self._data
        if hasattr(data, "keys"):  # a DatasetDict: pick the split
            if name not in data:
                raise DatasetError(f"dataset {self.options.path!r} has no split {name!r} (it has: "
                                   f"{', '.join(data.keys())}); set data.{split}")  # fmt: skip
            data = data[name]
        return data

    def _columns(self) -> list[str]:
        # Flickr8k-style sets keep each reference in its own column (caption_0 ... caption_4).
        o = self.options
        return [o.caption_column] if isinstance(o.caption_column, str) else list(o.caption_column)

    def rows(self, split: str) -> Rows | None:
        """The split's own Arrow table, memory-mapped; a streamed split (read once, in order) is spooled."""
        data = self._split(split)
        if data is None:
            return None
        o, columns = self.options, self._columns()
        if o.streaming or not hasattr(data, "_fingerprint"):
            return spool(self.examples(split))
        missing = [c for c in (o.image_column, *columns) if c not in data.column_names]
        if missing:
            raise DatasetError(f"dataset {o.path!r} split {getattr(o, split)!r}: rows have no column "
                               f"{', '.join(missing)}; found {', '.join(data.column_names)} (set data.image_column / "
                               "data.caption_column)")  # fmt: skip
        import datasets

        # A table that holds its images is named by its fingerprint; one that holds paths is checked file by file.
        embedded = isinstance(data.features.get(o.image_column), datasets.Image)
        identity = f"{FORMAT}:{data._fingerprint}:{o.image_column}" if embedded else None
        return ArrowRows(data, o.image_column, columns, identity=identity)

    def examples(self, split: str) -> Iterator[Example]:
        data = self._split(split)
        if data is None:
            return
        o, columns, name = self.options, self._columns(), getattr(self.options, split)
        for row in data:
            missing = [c for c in (o.image_column, *columns) if c not in row]
            if missing:
                raise DatasetError(f"dataset {o.path!r} split {name!r}: rows have no column {', '.join(missing)}; "
                                   f"found {', '.join(row)} (set data.image_column / data.caption_column)")  # fmt: skip
            yield Example(image=row[o.image_column], captions=row_captions(row, columns))

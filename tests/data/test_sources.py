from __future__ import annotations

import json

import pytest
from PIL import Image

import prefixcap
from prefixcap.data.sources import DatasetError
from prefixcap.train import run


def write_split(directory, name, rows):
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (24, 24), colour).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    rows = [{"image": f"img/{i}.png", "captions": [f"a {c} square", f"{c}"]}
            for i, c in enumerate(["red", "blue", "green", "yellow"])]  # fmt: skip
    write_split(tmp_path, "train", rows + [{"image": "img/broken.png", "captions": "a broken file"},
                                           {"image": "img/missing.png", "captions": "a missing file"}])  # fmt: skip
    write_split(tmp_path, "val", rows[:2])
    return tmp_path


def test_jsonl_examples_resolve_paths_and_accept_one_or_many_captions(folder):
    source = prefixcap.create("dataset", "jsonl", {"train": str(folder / "train.jsonl")})
    examples = list(source.examples("train"))
    assert [e.image for e in examples[:2]] == [folder / "img" / "0.png", folder / "img" / "1.png"]
    assert examples[0].captions == ["a red square", "red"] and examples[4].captions == ["a broken file"]
    assert list(source.examples("test")) == []  # no test file given


def test_training_on_jsonl_skips_and_counts_bad_images(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    data = {"name": "jsonl", "train": str(folder / "train.jsonl"), "val": str(folder / "val.jsonl")}
    overrides = [f"data={json.dumps(data)}", "train.steps=2", "train.batch_size=4", "generate.max_new_tokens=4"]
    result = run("quickstart", overrides, run_dir=tmp_path / "run", report=lambda r: None)
    assert result.metrics["train_examples"] == 4 and result.metrics["skipped_images"] == 2
    assert "val_loss" in result.metrics  # no test split: the final evaluation is on val


def test_malformed_lines_are_clear_errors(tmp_path):
    path = write_split(tmp_path, "train", [{"image": "a.png", "captions": ["ok"]}])
    path.write_text(path.read_text() + '{"image": "b.png"}\n')
    source = prefixcap.create("dataset", "jsonl", {"train": str(path)})
    with pytest.raises(DatasetError, match=r"train.jsonl:2: expected a JSON object with 'image' and 'captions'"):
        list(source.examples("train"))
    with pytest.raises(DatasetError, match="cannot read the train split"):
        list(prefixcap.create("dataset", "jsonl", {"train": str(tmp_path / "nope.jsonl")}).examples("train"))

from __future__ import annotations

import json

import pytest
from PIL import Image

import prefixcap
from prefixcap.data.sources import DatasetError
from prefixcap.training import run


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
    overrides = [f"data={json.dumps(data)}", "train.steps=2", "train.batch_size=4", "generate.max_new_tokens=4",
                 "eval.clip_model=null"]  # CLIP B/32, the default for such data, is on the hub
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


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_hf_dataset_saved_to_disk(tmp_path, hf_cache):
    import datasets

    images = [Image.new("RGB", (20, 20), c) for c in ("red", "blue", "green")]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    rows = {"image": images, "caption": [["a red square", "red"], ["a blue square"], ["a green square", "green"]]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "validation": split.select([0])}).save_to_disk(str(tmp_path / "set"))

    source = prefixcap.create("dataset", "hf", {"path": str(tmp_path / "set")})
    train = list(source.examples("train"))
    assert [e.captions for e in train] == rows["caption"] and train[1].image.getpixel((5, 5)) == (0, 0, 255)
    assert [e.captions for e in source.examples("val")] == [["a red square", "red"]]
    with pytest.raises(DatasetError, match="has no split 'test'"):
        list(source.examples("test"))


def test_hf_image_folder_with_metadata(tmp_path, hf_cache):
    folder = tmp_path / "photos"
    (folder / "train").mkdir(parents=True)
    for i, colour in enumerate(["red", "yellow"]):
        Image.new("RGB", (16, 16), colour).save(folder / "train" / f"{i}.png")
    (folder / "train" / "metadata.jsonl").write_text(
        '{"file_name": "0.png", "text": "a red tile"}\n{"file_name": "1.png", "text": "a yellow tile"}\n')
    source = prefixcap.create("dataset", "hf", {"path": str(folder), "caption_column": "text", "val": None,
                                                "test": None})  # fmt: skip
    examples = list(source.examples("train"))
    assert sorted(e.captions[0] for e in examples) == ["a red tile", "a yellow tile"]
    assert all(e.image.size == (16, 16) for e in examples)


def test_hf_unreachable_dataset_is_a_clear_error(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = prefixcap.create("dataset", "hf", {"path": "nobody/no-such-captions"})
    with pytest.raises(DatasetError, match="cannot load dataset 'nobody/no-such-captions'"):
        list(source.examples("train"))


def test_hf_references_in_several_columns_as_flickr8k_keeps_them(tmp_path, hf_cache):
    """jxie/flickr8k (the real recipes' default data) has image, caption_0 ... caption_4: the same layout, locally."""
    import datasets

    columns = [f"caption_{i}" for i in range(5)]
    rows = {"image": [Image.new("RGB", (8, 8), "red")], **{c: [f"a red tile, take {i}"] for i, c in enumerate(columns)}}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "f8k"))
    options = {"path": str(tmp_path / "f8k"), "caption_column": columns}
    (example,) = prefixcap.create("dataset", "hf", options).examples("train")
    assert example.captions == [f"a red tile, take {i}" for i in range(5)]
    broken = prefixcap.create("dataset", "hf", {**options, "caption_column": [*columns, "caption_5"]})
    with pytest.raises(DatasetError, match="rows have no column caption_5; found image, caption_0"):
        list(broken.examples("train"))

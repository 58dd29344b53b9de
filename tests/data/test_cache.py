"""The feature cache: keyed by what features depend on, stored in shards any safetensors reader opens, resumed after
a killed build, exact in fp32 and close in fp16. (Concurrent builders and truncated shards: tests/reliability.)"""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from prefixcap import compose, create
from prefixcap.data.cache import cache_key
from prefixcap.data.loader import index_split
from prefixcap.data.loader import cache_features

TINY = {"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": {"name": "mlp", "hidden": 32},
        "decoder": {"name": "smollm", "checkpoint": "tiny"}}  # fmt: skip
ROW_BYTES = 16 * 64 * 2  # the tiny SigLIP: 16 tokens of width 64, fp16


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("prefixcap.data.cache.SHARD_BYTES", 10 * ROW_BYTES)  # 10 rows a shard
    return tmp_path / "cache" / "features"


def encoded(system, source) -> torch.Tensor:
    """What the encoder makes of every image of the train split, computed directly."""
    with torch.no_grad():
        pixels = system.encoder.preprocess([e.image for e in source.examples("train")])
        return system.encoder.eval()(pixels)


def test_shards_hold_what_the_encoder_computes_exactly_in_fp32_and_within_fp16_rounding(cache):
    system = compose(TINY)
    source = create("dataset", "shapes", {"train_size": 25, "image_size": 32})
    direct = encoded(system, source)
    exact, half = index_split(source, "train"), index_split(source, "train")
    cache_features(system, exact, dtype="fp32", num_workers=0)
    cache_features(system, half, num_workers=0)  # fp16, the default
    assert torch.equal(exact.features.read(range(25)), direct)
    assert torch.allclose(half.features.read(range(25)), direct, rtol=2**-10, atol=1e-6)
    assert half.features.nbytes() < 0.51 * exact.features.nbytes()
    assert exact.features.directory != half.features.directory  # the dtype is part of the key
    shards = sorted(half.features.directory.glob("shard-*.safetensors"))
    assert len(shards) == 3  # 10 + 10 + 5 rows
    with safe_open(str(shards[2]), "pt") as shard:  # the layout is plain safetensors
        assert shard.get_tensor("features").dtype == torch.float16
        assert torch.equal(shard.get_tensor("features").float(), half.features.read(range(20, 25)))
    assert json.loads((half.features.directory / "done.json").read_text())["rows"] == 25


def test_a_killed_build_resumes_after_its_last_complete_shard(cache, monkeypatch):
    system = compose(TINY)
    source = create("dataset", "shapes", {"train_size": 25, "image_size": 32})
    calls = []
    real = __import__("prefixcap.data.loader", fromlist=["RowImages"]).RowImages

    class Killed(real):
        def __init__(self, rows, span, processor):
            calls.append(span)
            if len(calls) == 2:
                raise KeyboardInterrupt  # as Ctrl-C while the second shard is being encoded
            super().__init__(rows, span, processor)

    monkeypatch.setattr("prefixcap.data.loader.RowImages", Killed)
    with pytest.raises(KeyboardInterrupt):
        cache_features(system, index_split(source, "train"), num_workers=0)
    (directory,) = [p for p in cache.iterdir() if p.is_dir()]
    assert [p.name for p in directory.iterdir()] == ["shard-00000.safetensors"]  # no half shard, no done.json
    monkeypatch.setattr("prefixcap.data.loader.RowImages", real)
    split = index_split(source, "train")
    assert cache_features(system, split, num_workers=0).encoded == 15  # shards 1 and 2 only
    assert torch.allclose(split.features.read(range(25)), encoded(system, source), rtol=2**-10, atol=1e-6)
    assert cache_features(system, index_split(source, "train"), num_workers=0).encoded == 0  # complete: reused


def test_the_key_follows_the_encoder_weights_and_the_image_files(tmp_path, cache):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
    index = tmp_path / "train.jsonl"
    index.write_text("".join(json.dumps({"image": f"images/{i}.png", "captions": ["x"]}) + "\n" for i in range(2)))
    source = create("dataset", "jsonl", {"train": str(index)})
    system = compose(TINY)
    key = cache_key(system.encoder, source.rows("train"), "fp16")
    assert cache_key(system.encoder, source.rows("train"), "fp16") == key  # the same files: the same key
    Image.new("RGB", (32, 32), "green").save(images / "1.png")  # an image rewritten in place
    os.utime(images / "1.png", ns=(1, 1))
    changed = cache_key(system.encoder, source.rows("train"), "fp16")
    assert changed != key
    with torch.no_grad():
        next(system.encoder.parameters()).add_(1)
    assert cache_key(system.encoder, source.rows("train"), "fp16") not in (key, changed)


def test_features_are_read_in_workers_and_in_the_training_process_alike(cache):
    """A run may read its cache from DataLoader workers (train.num_workers > 0): forked readers open their own
    descriptors and get the same rows."""
    from prefixcap.data.loader import TrainItems, loader

    system = compose(TINY)
    split = index_split(create("dataset", "shapes", {"train_size": 12, "image_size": 32}), "train")
    cache_features(system, split, num_workers=0)
    split.features.read([0])  # opens a descriptor here first, which the workers inherit
    keys = [(0, k) for k in range(12)]
    items = TrainItems(split, 0, None)
    here = torch.stack([items[key].x for key in keys])
    batches = loader(items, workers=2, batch_sampler=[keys[0:4], keys[4:8], keys[8:12]])
    there = torch.cat([batch.x for batch in batches])
    assert torch.equal(here, there)

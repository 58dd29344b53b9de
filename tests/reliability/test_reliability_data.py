"""Bad images never stop a run or a captioning job (they are counted and reported), and runs that share the
feature cache never corrupt it. Through the real `prefixcap` command and real concurrent processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from prefixcap import compose, create
from prefixcap.data.loader import index_split
from prefixcap.data.loader import cache_features

from conftest import REPO, fit_batch, run_cli
from image_files import png_bomb, write_inputs


@pytest.fixture
def images(tmp_path) -> tuple[list[Path], list[Path]]:
    good, bad = write_inputs(tmp_path / "images")
    bad = [p for p in bad if p.name != "bomb.png"]  # that one is only a bomb under the limit the unit tests set
    bad.append(png_bomb(tmp_path / "images" / "bomb.png"))  # a real one: a header claiming 10 gigapixels
    (tmp_path / "images" / "folder.png").mkdir()  # a directory where a file was expected
    bad.append(tmp_path / "images" / "folder.png")
    return good, bad


def test_training_data_with_every_kind_of_bad_image_trains_and_counts_them(images, tmp_path):
    good, bad = images
    rows = [{"image": str(p), "captions": ["a red square"]} for p in [*good, *bad]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[-2:]))
    data = {"name": "jsonl", "train": str(tmp_path / "train.jsonl"), "val": str(tmp_path / "val.jsonl")}
    result = run_cli("run", "quickstart", "--out", str(tmp_path / "run"), f"--set=data={json.dumps(data)}",
                     "--set=train.steps=2", "--set=train.batch_size=4", "--set=generate.max_new_tokens=4",
                     "--set=eval.clip_model=null", env={"PREFIXCAP_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_examples"] == len(good)
    assert metrics["skipped_images"] == len(bad) + 2  # every bad file in train, and the two in val
    print(f"training: {len(good) + len(bad)} files, {len(bad)} unreadable, all skipped and counted")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny system fitted to say "a red square" whatever the image, saved: something for `prefixcap caption` to
    load. Fitted on two colours only it said nothing, or "square square...", for the white, black and grey images
    (16-bit, RGBA, palette); the colours below span what the good files hold once decoded."""
    torch.manual_seed(0)
    system = compose({"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": {"name": "mlp", "hidden": 32},
                      "decoder": {"name": "smollm", "checkpoint": "tiny"}})  # fmt: skip
    colours = ("red", "navy", "white", "black", "grey", "blue")
    fit_batch(system, [Image.new("RGB", (40, 40), c) for c in colours], ["a red square"] * len(colours), 60)
    return system.save(tmp_path_factory.mktemp("system") / "final")


def test_captioning_every_kind_of_bad_image_reports_each_and_captions_the_rest(images, saved):
    good, bad = images
    result = run_cli("caption", str(saved), *map(str, [*good, *bad]), "--max-new-tokens", "6")
    assert result.returncode == 1, result.stderr  # something failed: a script can tell
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in [*good, *bad]]  # one row per input, in order
    failed = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(failed) == {str(p) for p in bad}, failed
    assert "over the limit" in failed[str(bad[-2])] or "decompression bomb" in failed[str(bad[-2])]
    captions = {r["path"]: r["caption"] for r in rows if not r["error"]}
    assert captions == {str(p): "A red square." for p in good}  # every good file, whatever its format
    assert "Traceback" not in result.stderr
    print(f"captioning: {len(rows)} files, {len(failed)} reported, {len(rows) - len(failed)} captioned")


WRITER = """
    import hashlib, os, sys, time
    from pathlib import Path
    import prefixcap.data.cache as cache
    from prefixcap import compose, create
    from prefixcap.data.loader import index_split
    from prefixcap.data.loader import cache_features

    cache.SHARD_BYTES = 256 * 64 * 128 * 2  # 256 rows a shard: four shards, so builders could interleave them
    system = compose("quickstart")
    split = index_split(create("dataset", "shapes", {"train_size": 1024}), "train")
    barrier, writers = Path(sys.argv[1]), int(sys.argv[2])
    (barrier / str(os.getpid())).touch()
    while len(list(barrier.iterdir())) < writers:  # every writer starts building at the same moment
        time.sleep(0.01)
    built = cache_features(system, split, num_workers=0, batch_size=64)
    features = split.features.read(range(1024))
    print(hashlib.sha256(features.numpy().tobytes()).hexdigest(), built.encoded)
"""


def test_runs_building_the_feature_cache_at_once_do_not_corrupt_it(tmp_path):
    env = {**os.environ, "PREFIXCAP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    script = "import torch\n" + textwrap.dedent(WRITER)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", script, str(barrier), "3"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(3)]  # fmt: skip
    outputs = [w.communicate(timeout=300) for w in writers]
    assert all(w.returncode == 0 for w in writers), [err for _, err in outputs]
    digests = {out.split()[0] for out, _ in outputs}
    assert len(digests) == 1  # every writer read back the same features
    assert sorted(int(out.split()[1]) for out, _ in outputs) == [0, 0, 1024]  # one built, two waited and read it
    (directory,) = [p for p in (tmp_path / "cache" / "features").iterdir() if p.is_dir()]
    assert sorted(p.name for p in directory.iterdir()) == ["done.json", *(f"shard-{i:05d}.safetensors"
                                                                          for i in range(4))]  # no temporaries
    with safe_open(str(directory / "shard-00003.safetensors"), "pt") as shard:  # any safetensors reader opens it
        assert shard.get_tensor("features").shape == (256, 64, 128) and shard.get_tensor("ok").all()


def test_a_truncated_cache_shard_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("prefixcap.data.cache.SHARD_BYTES", 16 * 64 * 128 * 2)  # 16 rows a shard
    system = compose("quickstart")
    source = create("dataset", "shapes", {"train_size": 64})
    first = index_split(source, "train")
    cache_features(system, first, num_workers=0)
    features = first.features.read(range(64))
    path = first.features.directory / "shard-00002.safetensors"
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short (a full disk, a killed rsync)
    again = index_split(source, "train")
    assert cache_features(system, again, num_workers=0).encoded == 16  # that shard only
    assert torch.equal(again.features.read(range(64)), features)  # and the cache is whole again


def test_captioning_into_a_pipe_that_closes_early_ends_quietly(images, saved):
    """`prefixcap caption DIR | head -1`: the reader leaves, the command stops without a traceback."""
    good, _ = images
    exe = Path(sys.executable).with_name("prefixcap")
    process = subprocess.Popen([str(exe), "caption", str(saved), *map(str, good * 4), "--batch-size", "1", "--raw",
                                "--max-new-tokens", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(process.stdout.readline())["path"] == str(good[0])
    process.stdout.close()  # as `head -1` does after its line
    process.stdout = None  # communicate() then reads stderr only, the pipe above being closed
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr

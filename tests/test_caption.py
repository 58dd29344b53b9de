"""`prefixcap caption` and its API: robust image reading, batch captioning with error rows, alt-text tidy-up."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prefixcap import compose, images
from prefixcap.caption import (EMPTY_CAPTION, CaptionError, caption_paths, expand_paths, load_clip_scorer,
                               tidy_alt_text)  # fmt: skip
from prefixcap.errors import ImageError
from prefixcap.images import open_image
from prefixcap.recipe import load_recipe

from conftest import REPO, fit_batch, run_cli
from image_files import (animated_gif, cmyk_jpeg, palette_png, rgba_png, saved_image, sixteen_bit_png,
                         truncated_jpeg, write_inputs)  # fmt: skip

TINY = {
    "encoder": {"name": "siglip", "checkpoint": "tiny"},
    "connector": {"name": "mlp", "hidden": 32, "dropout": 0.0},
    # trained whole: LoRA on a random decoder moves its logits so little that what it says is a matter of its init
    "decoder": {"name": "smollm", "checkpoint": "tiny", "finetune": "full"},
}
CAPTION = "A red square."  # what the fitted tiny system says of a red image, once tidied


@pytest.fixture(scope="module")
def system():
    torch.manual_seed(0)
    system = compose(TINY)
    fit_batch(system, [Image.new("RGB", (40, 40), c) for c in ("red", "navy", "white")], ["a red square"] * 3, 30)
    return system


@pytest.fixture(scope="module")
def saved(system, tmp_path_factory) -> Path:
    return system.save(tmp_path_factory.mktemp("system") / "final")


# --- open_image ------------------------------------------------------------------------------------------------


def test_open_image_scales_16_bit_greyscale_to_8_bits(tmp_path):
    image = open_image(sixteen_bit_png(tmp_path / "sixteen.png"))
    assert image.mode == "RGB"
    assert np.asarray(image)[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]  # not clipped to white


def test_open_image_composites_transparency_over_white(tmp_path):
    palette = np.asarray(open_image(palette_png(tmp_path / "palette.png")))
    assert palette[0].tolist() == [[255, 255, 255], [255, 0, 0]]  # transparent black shows the page
    rgba = np.asarray(open_image(rgba_png(tmp_path / "rgba.png")))
    assert rgba[0].tolist() == [[255, 255, 255], [0, 0, 255], [127, 127, 127]]


def test_open_image_reads_cmyk_greyscale_animated_and_rotated_files(tmp_path):
    cmyk = np.asarray(open_image(cmyk_jpeg(tmp_path / "cmyk.jpg")), dtype=int)
    assert np.abs(cmyk[8, 8] - [255, 0, 0]).max() <= 8  # JPEG is lossy
    grey = open_image(saved_image(tmp_path / "grey.png", Image.new("L", (4, 4), 90)))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (90, 90, 90)
    assert open_image(animated_gif(tmp_path / "animated.gif")).getpixel((0, 0)) == (255, 0, 0)  # the first frame
    sideways = Image.new("RGB", (4, 2), "red")
    exif = sideways.getexif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate it 90 degrees
    sideways.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (2, 4)


def test_open_image_says_what_is_wrong(tmp_path):
    _, bad = write_inputs(tmp_path)
    truncated, empty, text, _, missing = bad
    expected = {truncated: "cannot decode image", empty: "empty file", text: "not an image",
                missing: "No such file or directory", tmp_path: "Is a directory"}  # fmt: skip
    for path, reason in expected.items():
        with pytest.raises(ImageError, match=reason) as caught:
            open_image(path)
        assert caught.value.path == path and str(caught.value).startswith(f"{path}: ")


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    path = saved_image(tmp_path / "bomb.png", Image.new("RGB", (500, 500), "red"))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 200_000)
    with pytest.raises(ImageError, match="500x500 pixels is over the limit of 200,000"):
        open_image(path)
    # PIL's own check only warns at its limit; that warning refuses the file too
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(path)


def test_training_reads_image_files_the_same_way(tmp_path):
    from prefixcap.images import ImageError as ReExported
    from prefixcap.images import to_rgb_tensor

    assert ReExported is ImageError
    pixels = to_rgb_tensor(sixteen_bit_png(tmp_path / "sixteen.png"))
    assert pixels.shape == (3, 1, 3) and torch.allclose(pixels[:, 0], torch.tensor([0.0, 100 / 255, 1.0]))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        to_rgb_tensor(tmp_path / "empty.png")


# --- caption_paths ---------------------------------------------------------------------------------------------


def test_caption_paths_captions_what_it_can_and_reports_the_rest(system, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 150_000)  # the 10000x10 image is under it, bomb.png is not
    good, bad = write_inputs(tmp_path)
    order = [good[0], *bad[:2], *good[1:5], *bad[2:], *good[5:]]
    rows = list(caption_paths(system, order, batch_size=4, max_new_tokens=6))
    assert [row.path for row in rows] == [str(p) for p in order]
    for row in rows:
        if Path(row.path) in good:
            assert row.error is None and row.caption and row.caption[0].isupper() and row.caption[-1] == ".", row
        else:
            assert row.caption is None and row.error, row
    assert rows[0].caption == CAPTION
    errors = {Path(row.path).name: row.error for row in rows if row.error}
    assert "cannot decode image" in errors["truncated.jpg"] and errors["empty.png"] == "empty file"
    assert "not an image" in errors["text.png"] and "decompression bomb" in errors["bomb.png"]
    assert errors["missing.jpg"] == "No such file or directory"
    raw = next(caption_paths(system, [good[0]], tidy=False, max_new_tokens=6))
    assert raw.caption == "a red square"


class Recording:
    """A captioner that notes each batch it is given, and fails on any batch holding a 1-pixel-wide image."""

    def __init__(self, system):
        self.system, self.batches = system, []

    def caption(self, images, **generate):
        self.batches.append(len(images))
        if any(image.width == 1 for image in images):
            raise RuntimeError("this model cannot take 1-pixel images")
        return self.system.caption(images, **generate)


def test_caption_paths_streams_each_batch_in_input_order(system, tmp_path):
    paths = [saved_image(tmp_path / f"{i}.png", Image.new("RGB", (20, 20), "red")) for i in range(5)]
    captioner = Recording(system)
    rows = caption_paths(captioner, [tmp_path / "nothing.png", *paths], batch_size=2, max_new_tokens=6)
    assert next(rows).error == "No such file or directory" and captioner.batches == []  # nothing waits for it
    assert [next(rows).path, next(rows).path] == [str(paths[0]), str(paths[1])] and captioner.batches == [2]
    assert [row.path for row in rows] == [str(p) for p in paths[2:]] and captioner.batches == [2, 2, 1]


def test_a_batch_the_model_fails_on_is_captioned_image_by_image(system, tmp_path):
    paths = [saved_image(tmp_path / f"{i}.png", Image.new("RGB", (1 if i == 1 else 20, 20), "red")) for i in range(3)]
    captioner = Recording(system)
    rows = list(caption_paths(captioner, paths, batch_size=3, max_new_tokens=6))
    assert captioner.batches == [3, 1, 1, 1]
    assert [row.error for row in rows] == [None, "captioning failed: this model cannot take 1-pixel images", None]
    assert rows[0].caption == rows[2].caption == CAPTION


class Silent:
    def caption(self, images, **generate):
        return ["  "] * len(images)


def test_empty_captions_are_reported_not_prettified(tmp_path):
    path = saved_image(tmp_path / "red.png", Image.new("RGB", (8, 8), "red"))
    tidied, raw = next(caption_paths(Silent(), [path])), next(caption_paths(Silent(), [path], tidy=False))
    assert (tidied.caption, tidied.error) == ("", EMPTY_CAPTION)
    assert (raw.caption, raw.error) == ("  ", EMPTY_CAPTION)


def test_expand_paths_walks_folders_and_patterns_in_sorted_order(tmp_path):
    for name in ("b/z.JPG", "b/a.png", "a.webp", "b/c/d.Tiff", "notes.txt", "b/c/e.gif.bak"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    found = list(expand_paths([tmp_path / "b", str(tmp_path / "**" / "*.webp"), str(tmp_path / "notes.txt"),
                               str(tmp_path / "*.nothing"), tmp_path / "empty", "missing.png"]))  # fmt: skip
    assert found == [
        (str(tmp_path / "b" / "a.png"), None),
        (str(tmp_path / "b" / "c" / "d.Tiff"), None),
        (str(tmp_path / "b" / "z.JPG"), None),
        (str(tmp_path / "a.webp"), None),
        (str(tmp_path / "notes.txt"), None),  # named outright: read (and reported) as given
        (str(tmp_path / "*.nothing"), "pattern matches no image files"),
        (str(tmp_path / "empty"), "folder holds no image files"),
        ("missing.png", None),  # for open_image to report
    ]


# --- alt text --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, tidy", [
    ("a red square", "A red square."),
    ("an image of a red square", "A red square."),
    ("A PICTURE OF  a dog\non a sofa", "A dog on a sofa."),
    ("a photo of an illustration of two cats", "Two cats."),
    ("This is a photograph showing a bridge", "A bridge."),
    ("a photo of", "A photo of."),  # nothing else to say: left alone
    ("photos of the family.", "Photos of the family."),
    ("is this a cat?", "Is this a cat?"),
    ("what a view!", "What a view!"),
    ("a dog, ", "A dog."),
    ("a dog..", "A dog.."),
    ("", ""),
    ("   ", ""),
])  # fmt: skip
def test_tidy_alt_text(raw, tidy):
    assert tidy_alt_text(raw) == tidy


def test_tidy_alt_text_cuts_at_a_word_boundary():
    text = "a red square on the left, a blue circle in the middle and a green triangle on the right"
    for limit in range(2, len(text) + 3):
        tidied = tidy_alt_text(text, limit)
        assert len(tidied) <= limit and tidied.endswith(".")
        words = tidied[:-1].lower().replace(",", "").split()
        assert words == text.replace(",", "").split()[: len(words)] or len(words) == 1  # whole words
        assert len(words) == 1 or words[-1] not in ("a", "the", "and", "in", "on")  # nor on a word that leads on
    assert tidy_alt_text(text, 30) == "A red square on the left."
    assert tidy_alt_text("an image of " + "x" * 200, 10) == "Xxxxxxxxx."
    assert tidy_alt_text(text, None).endswith("on the right.")
    with pytest.raises(ValueError):
        tidy_alt_text(text, 1)


# --- CLIPScore -------------------------------------------------------------------------------------------------


def test_clip_scorer_is_the_recipes_unless_named():
    parts = {"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "mlp", "decoder": "smollm"}
    assert load_clip_scorer(load_recipe({**parts, "data": "shapes"})).checkpoint == "prefixcap/shapes-clip"
    assert load_clip_scorer(None, "prefixcap/shapes-clip").checkpoint == "prefixcap/shapes-clip"
    with pytest.raises(CaptionError, match="eval.clip_model is null; name one with --clip-model"):
        load_clip_scorer(load_recipe({**parts, "eval": {"clip_model": None}}))
    with pytest.raises(CaptionError, match="'openai/clip-vit-base-patch32'.*--clip-model picks another"):
        load_clip_scorer(load_recipe(parts))  # auto, no data: the paper's CLIP, which is not there offline


def test_reading_and_captioning_modules_do_not_import_torch():
    code = "import sys, prefixcap.cli, prefixcap.caption, prefixcap.images; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- the command -----------------------------------------------------------------------------------------------


def test_cli_captions_a_folder_to_jsonl_and_csv(saved, tmp_path):
    folder = tmp_path / "images"
    for name, colour in (("a.png", "red"), ("b/c.jpg", "navy")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), colour).save(folder / name)
    truncated_jpeg(folder / "b" / "broken.jpg")
    result = run_cli("caption", str(saved), str(folder), "--max-new-tokens", "6")
    assert result.returncode == 1, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(folder / "a.png"), str(folder / "b" / "broken.jpg"),
                                             str(folder / "b" / "c.jpg")]  # fmt: skip
    assert rows[0] == {"path": str(folder / "a.png"), "caption": CAPTION, "error": None}
    assert rows[1]["caption"] is None and "cannot decode image" in rows[1]["error"]
    assert result.stderr.strip().splitlines()[-1] == "captioned 2 of 3 images; 1 error"

    out = tmp_path / "captions.csv"
    as_csv = run_cli("caption", str(saved), str(folder / "**" / "*.jpg"), "--format", "csv", "--out", str(out),
                     "--max-new-tokens", "6")  # fmt: skip
    assert as_csv.returncode == 1 and as_csv.stdout == ""
    with out.open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "caption", "error"]
    assert [row[0] for row in table[1:]] == [str(folder / "b" / "broken.jpg"), str(folder / "b" / "c.jpg")]
    assert table[2][1:] == [CAPTION, ""] and table[1][1] == ""
    assert "captioned 1 of 2 images; 1 error" in as_csv.stderr


def test_cli_reads_paths_from_stdin_scores_and_exits_0_when_all_are_captioned(saved, tmp_path):
    paths = [saved_image(tmp_path / f"{i}.png", Image.new("RGB", (24, 24), "red")) for i in range(3)]
    stdin = "".join(f"{p}\n" for p in paths[1:]) + "\n"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("prefixcap")), "caption", str(saved), str(paths[0]), "-", "--format",
         "text", "--clip-model", "prefixcap/shapes-clip", "--max-new-tokens", "6"],
        input=stdin, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [line[:2] for line in lines] == [[str(p), CAPTION] for p in paths]
    assert all(0 <= float(line[2]) <= 2.5 for line in lines)  # CLIP-S
    assert "captioned 3 of 3 images; mean CLIP-S" in result.stderr.splitlines()[-1]


def test_cli_problems_before_captioning_exit_2_with_one_line(saved, tmp_path):
    missing = run_cli("caption", str(tmp_path / "no-run"), "x.png")
    assert missing.returncode == 2 and missing.stderr == f"error: {tmp_path / 'no-run'}: no such directory; " \
                                                         "expected a run directory or a saved system\n"  # fmt: skip
    no_paths = run_cli("caption", str(saved))
    assert no_paths.returncode == 2 and "at least one PATH" in no_paths.stderr
    greedy = run_cli("caption", "--onnx", str(tmp_path), "x.png", "--beams", "2")
    assert greedy.returncode == 2 and "--onnx captions greedily" in greedy.stderr
    no_scorer = run_cli("caption", str(saved), str(tmp_path), "--score")
    assert no_scorer.returncode == 2 and "--clip-model picks another CLIPScore model" in no_scorer.stderr
    assert no_scorer.stdout == "" and "Traceback" not in no_scorer.stderr

"""Letterbox preprocessing (ImageProcessor resize="letterbox"), ImageProcessor.placement, the recipe's image section,
and the resize mode chosen at caption time: in Python, on the command line, and in the ONNX captioner. (PyTorch vs
ONNX vs browser pixels for every mode: tests/test_export.py and tests/test_web_demo.py.)"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import prefixcap
from prefixcap import RecipeError, compose, create, load_recipe
from prefixcap.data import ShapesOptions
from prefixcap.data.cache import cache_key
from prefixcap.data.loader import Preprocess, cache_features, index_split
from prefixcap.data.shapes import ShapesSource
from prefixcap.export import export_system
from prefixcap.images import ImageProcessor
from prefixcap.interfaces import Encoder
from prefixcap.onnx_captioner import OnnxCaptioner

from conftest import fit_batch

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
FILL = (0.9, 0.1, 0.2)
RECIPE = {"system": "prefix", "encoder": {"name": "siglip", "checkpoint": "tiny"},
          "connector": {"name": "mlp", "hidden": 64, "dropout": 0.0},
          "decoder": {"name": "smollm", "checkpoint": "tiny", "finetune": "lora", "lora": {"r": 4, "dropout": 0.0}},
          "losses": [{"name": "caption-ce"}], "generate": {"max_new_tokens": 20}}  # fmt: skip
LETTERBOX = {**RECIPE, "image": {"resize": "letterbox", "fill": list(FILL)}}
SHAPES = ShapesSource(ShapesOptions(image_size=32, train_size=8, test_size=8))
TRAIN = list(SHAPES.examples("train"))
SQUARE = [e.image for e in SHAPES.examples("test")]  # at the tiny encoder's 32 pixels: never resampled
# Two shapes images side by side, and one above the other: 64x32 and 32x64, which the modes make different inputs of
WIDE = [Image.fromarray(np.concatenate([np.asarray(a), np.asarray(b)], axis=1)) for a, b in zip(SQUARE, SQUARE[1:4])]
TALL = [Image.fromarray(np.concatenate([np.asarray(a), np.asarray(b)], axis=0)) for a, b in zip(SQUARE, SQUARE[1:4])]
PIXELS_ATOL = 1e-4  # as tests/test_export.py: PIL's float bicubic against torch's


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread, the more so on a shared machine
    yield
    torch.set_num_threads(threads)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- the processor --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(20, 50), (50, 20), (31, 64), (7, 100)], ids=["wide", "tall", "odd", "long"])
def test_letterbox_keeps_the_aspect_pads_with_the_fill_exactly_and_loses_nothing(height, width):
    processor = ImageProcessor(32, MEAN, STD, resize="letterbox", fill=FILL)
    image = noise(height, width)
    out = processor.one(image)
    assert out.shape == (3, 32, 32)
    x0, y0, x1, y1 = processor.placement(width, height)
    assert (x0, y0, x1, y1) == tuple(float(round(v)) for v in (x0, y0, x1, y1))  # whole pixels: the image's rows
    nw, nh = int(x1 - x0), int(y1 - y0)
    scale = 32 / max(height, width)  # the long side to 32, the other as near its aspect as whole pixels go
    assert max(nw, nh) == 32 and abs(nw - width * scale) <= 0.5 and abs(nh - height * scale) <= 0.5
    # centred, the odd pixel of padding below or right
    assert (x0, y0) == ((32 - nw) // 2, (32 - nh) // 2) and 32 - x1 - x0 in (0, 1) and 32 - y1 - y0 in (0, 1)
    # the padding is the fill colour exactly, normalised as the image is
    padding = ((torch.tensor(FILL) - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1, 1).expand(3, 32, 32)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[int(y0) : int(y1), int(x0) : int(x1)] = True
    assert torch.equal(out[:, ~inside], padding[:, ~inside])
    # and the image part is the whole image resized (nothing cropped), as the torch resize makes it
    whole = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, size=(nh, nw), mode="bicubic",
                          antialias=True, align_corners=False)[0].clamp(0, 1)  # fmt: skip
    normalised = (whole - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.equal(out[:, int(y0) : int(y1), int(x0) : int(x1)], normalised)


def test_letterbox_pads_with_the_mean_by_default_which_normalises_to_zero():
    processor = ImageProcessor(32, MEAN, STD, resize="letterbox")
    assert processor.fill is None and processor.padding == MEAN
    out = processor.one(noise(16, 40))  # 40 -> 32, 16 -> 13 rows: 9 above, 10 below
    assert torch.count_nonzero(out[:, :9]) == 0 and torch.count_nonzero(out[:, 22:]) == 0
    assert torch.count_nonzero(out[:, 9:22]) > 0.9 * out[:, 9:22].numel()


@pytest.mark.parametrize("side", [20, 32, 64], ids=["up", "same", "down"])
def test_a_square_image_letterboxed_equals_squashed(side):
    image = noise(side, side)
    squash = ImageProcessor(32, MEAN, STD, resize="squash")
    letterbox = ImageProcessor(32, MEAN, STD, resize="letterbox", fill=FILL)
    assert torch.equal(letterbox.one(image), squash.one(image))
    # crop_pct cuts nothing off a letterbox (it still does the others)
    assert torch.equal(ImageProcessor(32, MEAN, STD, resize="letterbox", crop_pct=0.9).one(noise(20, 50)),
                       ImageProcessor(32, MEAN, STD, resize="letterbox").one(noise(20, 50)))  # fmt: skip


def test_unknown_modes_and_bad_fills_are_refused():
    with pytest.raises(ValueError, match="unknown resize mode 'box'; choose one of squash, crop, letterbox"):
        ImageProcessor(32, MEAN, STD, resize="box")
    for fill in [(0.5, 0.5), (0.5, 0.5, 1.5), (-0.1, 0, 0), ("0.5", 0, 0), (True, 0, 0)]:
        with pytest.raises(ValueError, match="fill is three numbers in"):
            ImageProcessor(32, MEAN, STD, resize="letterbox", fill=fill)
    assert ImageProcessor(32, MEAN, STD, resize="letterbox", fill=[0, 1, 0.5]).fill == (0.0, 1.0, 0.5)


# --- placement: where the original lands in the model's input --------------------------------------------------------

MODES = [("squash", 1.0), ("squash", 0.9), ("crop", 1.0), ("crop", 0.875), ("letterbox", 1.0), ("letterbox", 0.9)]
SIZES = [(40, 100), (100, 40), (50, 50), (20, 13), (13, 20), (31, 33), (10, 300), (300, 10)]  # (height, width)


@pytest.mark.parametrize("resize,crop_pct", MODES)
def test_placement_says_where_a_one_pixel_marker_lands(resize, crop_pct):
    """A white pixel on black, anywhere in the original that the input keeps: the centre of what preprocessing makes
    of it is where placement maps the pixel's centre (within 0.1 pixel), for wide, tall and square images, up- and
    downscaled, and long crops, which are resized only in part."""
    processor = ImageProcessor(32, MEAN, STD, resize=resize, crop_pct=crop_pct, fill=(0.0, 0.0, 0.0))
    for height, width in SIZES:
        if resize == "letterbox" and max(height, width) / min(height, width) > 5:
            continue  # 10 rows letterboxed into one: no centre to find across it
        x0, y0, x1, y1 = processor.placement(width, height)
        if resize == "letterbox":
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        elif resize == "squash" and crop_pct == 1:
            assert (x0, y0, x1, y1) == (0, 0, 32, 32)
        else:  # cut: the original reaches past the frame (a square one cropped at crop_pct 1 fills it exactly)
            assert x0 <= 0 and y0 <= 0 and x1 >= 32 and y1 >= 32
            assert (x0, y0, x1, y1) != (0, 0, 32, 32) or (height == width and crop_pct == 1)
        checked = 0
        for fx, fy in itertools.product([0.1, 0.3, 0.5, 0.77, 0.9], repeat=2):
            px, py = int(fx * width), int(fy * height)
            want_x = x0 + (px + 0.5) * (x1 - x0) / width
            want_y = y0 + (py + 0.5) * (y1 - y0) / height
            if not (3 <= want_x <= 29 and 3 <= want_y <= 29):
                continue  # cropped off, or too near the edge of the input to see whole
            image = np.zeros((height, width, 3), dtype=np.uint8)
            image[py, px] = 255
            red = processor.one(image)[0] * STD[0] + MEAN[0]  # back in [0, 1]
            row, col = np.unravel_index(int(red.argmax()), red.shape)
            rows, cols = slice(max(row - 3, 0), row + 4), slice(max(col - 3, 0), col + 4)
            weight = red[rows, cols].clamp(min=0).numpy()
            grid_y, grid_x = np.mgrid[rows, cols] + 0.5  # pixel centres
            got_x, got_y = (weight * grid_x).sum() / weight.sum(), (weight * grid_y).sum() / weight.sum()
            where = (height, width, px, py)
            assert abs(got_x - want_x) < 0.1 and abs(got_y - want_y) < 0.1, (where, got_x, got_y, want_x, want_y)
            assert abs(col + 0.5 - want_x) <= 0.75 and abs(row + 0.5 - want_y) <= 0.75, where
            checked += 1
        assert checked, (height, width)


# --- the recipe's image section -------------------------------------------------------------------------------------


def test_the_image_section_sets_the_preprocessing_of_any_encoder():
    system = compose(LETTERBOX)
    assert system.encoder.image_processor.resize == "squash"  # the family's own, untouched
    assert system.encoder.preprocessing.resize == "letterbox" and system.encoder.preprocessing.fill == FILL
    assert system.recipe.to_dict(resolved=True)["image"] == {"resize": "letterbox", "fill": list(FILL)}
    assert compose(RECIPE).encoder.preprocessing == compose(RECIPE).encoder.image_processor  # none: the family's
    crossattn = compose({"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"},
                         "image": {"resize": "crop"}})  # fmt: skip
    assert crossattn.encoder.preprocessing.resize == "crop"

    class Grey(Encoder):  # an encoder written elsewhere (a plugin's), that knows nothing of the image section
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 64)

        dim, num_tokens = 64, 4

        @property
        def image_processor(self):
            return ImageProcessor(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="crop")

        def forward(self, pixel_values):
            return self.proj(F.adaptive_avg_pool2d(pixel_values, 2).flatten(2).transpose(1, 2))

    system = compose({k: v for k, v in LETTERBOX.items() if k != "encoder"}, encoder=Grey())
    assert system.encoder.preprocessing == ImageProcessor(8, (0.5,) * 3, (0.5,) * 3, resize="letterbox", fill=FILL)
    top = (torch.tensor(FILL[0]) - torch.tensor(0.5)) / torch.tensor(0.5)  # in float32, as the processor computes
    assert system.encoder.preprocess([noise(4, 8)])[0, 0, :2].eq(top).all()  # the top rows: the fill
    assert len(system.caption([noise(4, 8)], max_new_tokens=2)) == 1


def test_bad_image_sections_are_refused_with_their_line(tmp_path):
    path = tmp_path / "r.yaml"
    head = ("system: prefix\nencoder: {name: siglip, checkpoint: tiny}\nconnector: mlp\n"
            "decoder: {name: smollm, checkpoint: tiny}\nimage:\n")  # image: on line 5, its keys on 6 and 7
    letterbox = "  resize: letterbox\n"
    cases = {
        "  resize: box\n": ":6: image.resize: Input should be 'squash', 'crop' or 'letterbox'; got 'box'",
        "  fill: [0.5, 0.5, 0.5]\n": ":6: image.fill: Value error, fill is letterbox's padding colour: set resize: "
                                     "letterbox with it",
        "  resize: crop\n  fill: [0, 0, 0]\n": ":7: image.fill: Value error, fill is letterbox's padding colour",
        letterbox + "  fill: 'true'\n": ":7: image.fill: Value error, fill is a list of three numbers",
        letterbox + "  fill: true\n": ":7: image.fill: Value error, fill is a list of three numbers",
        letterbox + "  fill: ['0.5', 0.5, 0.5]\n": ":7: image.fill.0: Input should be a valid number",
        letterbox + "  fill: [true, 0.5, 0.5]\n": ":7: image.fill.0: Input should be a valid number",
        letterbox + "  fill: [0.5, 0.5]\n": ":7: image.fill: Value error, fill is a list of three numbers",
        letterbox + "  fill: [0.5, 0.5, 1.5]\n": ":7: image.fill.2: Input should be less than or equal to 1",
        letterbox + "  size: 3\n": ":7: image.size: unknown option 'size' (expected one of: fill, resize)",
    }
    for section, message in cases.items():
        path.write_text(head + section)
        with pytest.raises(RecipeError) as error:
            load_recipe(path)
        assert str(error.value).startswith(f"{path}{message}"), (section, str(error.value))
    path.write_text(head + letterbox + "  fill: [0, 1, 0.5]\n")
    assert load_recipe(path).image.fill == (0.0, 1.0, 0.5)
    with pytest.raises(RecipeError, match=r"--set image.resize: image.resize: Input should be"):
        load_recipe(RECIPE, ["image.resize=stretch"])
    assert load_recipe(RECIPE, ["image.resize=letterbox"]).image.resize == "letterbox"


def test_letterbox_and_squash_features_are_cached_apart(tmp_path, monkeypatch):
    """The cache key holds the resize mode (and fill), and each cache holds what its own preprocessing makes."""
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(WIDE + TALL):
        image.save(folder / f"{i}.png")
    index = tmp_path / "train.jsonl"
    index.write_text("".join(json.dumps({"image": f"images/{i}.png", "captions": ["x"]}) + "\n" for i in range(6)))
    assert len(WIDE + TALL) == 6
    source = create("dataset", "jsonl", {"train": str(index)})
    systems = {}
    for name, recipe in [("squash", RECIPE), ("letterbox", LETTERBOX),
                         ("grey", {**RECIPE, "image": {"resize": "letterbox", "fill": [0.5, 0.5, 0.5]}})]:  # fmt: skip
        torch.manual_seed(0)  # the same tiny encoder weights in each
        systems[name] = compose(recipe)
    keys = {name: cache_key(s.encoder, source.rows("train"), "fp32") for name, s in systems.items()}
    assert len(set(keys.values())) == 3
    features = {}
    for name in ("squash", "letterbox"):
        system = systems[name]
        assert Preprocess(system.encoder).processor == system.encoder.preprocessing  # what the loader's workers run
        split = index_split(source, "train")
        cache_features(system, split, dtype="fp32", num_workers=0)
        with torch.no_grad():
            direct = system.encoder(system.encoder.preprocess(WIDE + TALL))
        features[name] = split.features.read(range(6))
        assert torch.equal(features[name], direct)
    assert not torch.allclose(features["squash"], features["letterbox"])


# --- a trained system: caption time, saving, export, the command line --------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(a squash system trained briefly and saved as a run's final/, its run directory, the same weights with the
    LETTERBOX image section, saved and exported to ONNX: that export's directory)."""
    torch.manual_seed(0)
    system = compose(RECIPE)
    fit_batch(system, [e.image for e in TRAIN], [e.captions[0] for e in TRAIN], steps=200, lr=3e-3)
    root = tmp_path_factory.mktemp("letterbox")
    system.save(root / "squash" / "final")
    letterbox = compose(LETTERBOX)
    letterbox.load_trained(root / "squash" / "final")
    letterbox.save(root / "letterbox" / "final")
    export_system(root / "letterbox", root / "letterbox" / "onnx", int8=False)
    return system, root / "squash", root / "letterbox" / "onnx"


def test_caption_takes_a_resize_mode_for_one_call(trained):
    system, _, _ = trained
    images = WIDE + TALL
    default = system.caption(images)
    pixels = system.encoder.preprocess(images, resize="letterbox")
    assert not torch.equal(pixels, system.encoder.preprocess(images))
    letterboxed = system.caption(images, resize="letterbox")
    assert system.caption(images) == default  # for that call only
    assert system.caption(SQUARE, resize="letterbox") == system.caption(SQUARE)  # a square image: the same input
    system.encoder.set_preprocessing("letterbox")
    try:
        assert system.caption(images) == letterboxed  # as a system whose recipe letterboxes
    finally:
        system.encoder.set_preprocessing(None)
    with pytest.raises(ValueError, match="unknown resize mode 'stretch'"):
        system.caption(images, resize="stretch")


def test_a_saved_system_comes_back_with_its_image_section(trained, tmp_path):
    _, run, _ = trained
    loaded = prefixcap.load(run.parent / "letterbox" / "final")
    assert loaded.encoder.preprocessing == ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, resize="letterbox", fill=FILL)
    manifest = json.loads((run.parent / "letterbox" / "final" / "manifest.json").read_text())
    assert manifest["recipe"]["image"] == {"resize": "letterbox", "fill": list(FILL)}
    plain = prefixcap.load(run / "final")
    assert plain.encoder.preprocessing.resize == "squash" and plain.recipe.image.resize is None
    assert loaded.caption(WIDE + TALL) != plain.caption(WIDE + TALL)
    # a manifest written before the image section (none in its recipe) loads as the encoder's own
    old = tmp_path / "old"
    old.mkdir()
    for item in (run / "final").iterdir():
        (old / item.name).symlink_to(item)
    (old / "manifest.json").unlink()
    manifest = json.loads((run / "final" / "manifest.json").read_text())
    del manifest["recipe"]["image"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert prefixcap.load(old).encoder.preprocessing == plain.encoder.preprocessing


def test_the_export_letterboxes_as_pytorch_does(trained, tmp_path):
    system, run, onnx = trained
    manifest = json.loads((onnx / "manifest.json").read_text())
    assert (manifest["image"]["resize"], manifest["image"]["fill"]) == ("letterbox", list(FILL))
    torch_system = prefixcap.load(run.parent / "letterbox" / "final")
    captioner = OnnxCaptioner(onnx)
    for images in (WIDE, TALL, [Image.fromarray(noise(37, 90)), Image.fromarray(noise(90, 37))]):
        got, want = captioner.pixel_values(images), torch_system.encoder.preprocess(images).numpy()
        assert np.abs(got - want).max() < PIXELS_ATOL
    # the padding is the fill exactly, and an image at the input's size is not resampled: identical pixels, captions
    padding = (np.float32(FILL[0]) - np.float32(0.5)) / np.float32(0.5)
    assert (captioner.pixel_values(WIDE)[:, 0, :8] == padding).all()
    assert np.array_equal(captioner.pixel_values(SQUARE), torch_system.encoder.preprocess(SQUARE).numpy())
    assert captioner.caption(SQUARE) == torch_system.caption(SQUARE)
    # another mode for one call, or for the captioner, resizes as PyTorch does in that mode
    squashed = captioner.pixel_values(WIDE, resize="squash")
    assert np.abs(squashed - system.encoder.preprocess(WIDE).numpy()).max() < PIXELS_ATOL
    assert np.array_equal(OnnxCaptioner(onnx, resize="squash").pixel_values(WIDE), squashed)
    with pytest.raises(ValueError, match="unknown resize mode 'stretch'"):
        captioner.caption(WIDE, resize="stretch")
    # a manifest written before letterbox (no fill) still loads; letterboxing it pads with the mean, as PyTorch
    copy = shutil.copytree(onnx, tmp_path / "old")
    old = json.loads((onnx / "manifest.json").read_text())
    old["image"] = {k: v for k, v in old["image"].items() if k != "fill"} | {"resize": "squash"}
    (copy / "manifest.json").write_text(json.dumps(old))
    legacy = OnnxCaptioner(copy)
    assert np.array_equal(legacy.pixel_values(WIDE), squashed)
    want = system.encoder.preprocess(WIDE, resize="letterbox").numpy()
    assert np.abs(legacy.pixel_values(WIDE, resize="letterbox") - want).max() < PIXELS_ATOL


def test_the_command_line_takes_a_resize_mode_for_a_run_and_an_export(trained, tmp_path):
    from prefixcap.cli import cli

    system, run, onnx = trained
    folder = tmp_path / "images"
    folder.mkdir()
    images = WIDE + TALL
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")

    def captions(*args: str) -> list[str]:
        result = CliRunner().invoke(cli, ["caption", *args, str(folder), "--format", "jsonl", "--raw"])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        rows.sort(key=lambda row: int(Path(row["path"]).stem))  # 0.png ... 5.png
        return [row["caption"] for row in rows]

    assert captions(str(run)) == system.caption(images)
    assert captions(str(run), "--resize", "letterbox") == system.caption(images, resize="letterbox")
    assert captions("--onnx", str(onnx)) == OnnxCaptioner(onnx).caption(images)
    squashed = captions("--onnx", str(onnx), "--resize", "squash")
    assert squashed == OnnxCaptioner(onnx).caption(images, resize="squash") != captions("--onnx", str(onnx))
    refused = CliRunner().invoke(cli, ["caption", str(run), str(folder), "--resize", "stretch"])
    assert refused.exit_code == 2 and "Invalid value for '--resize'" in refused.output
    assert "letterbox" in CliRunner().invoke(cli, ["caption", "--help"]).output


"""`prefixcap explain` and System.explain: per-word maps over the image, for both systems and both methods.

The parts first (each connector says which patches its tokens hold, rollout, peaks, words), on the quickstart recipes
with their random decoders; then the trained quickstart, whose maps must point at the shapes its caption names.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from prefixcap import compose, load
from prefixcap.data.shapes import ShapesSource, shape_words
from prefixcap.explain import ExplainError, Explanation, _words, explain, peak
from prefixcap.interfaces import Connector, attention_rollout, eager_attention
from prefixcap.pointing import pointing_game

from conftest import REPO, run_cli

SHAPES = ShapesSource()
EXAMPLES = [SHAPES.example("test", i) for i in range(3)]


def quickstart(connector: dict | None = None, crossattn: bool = False):
    recipe = yaml.safe_load((REPO / "recipes" / f"quickstart{'-crossattn' if crossattn else ''}.yaml").read_text())
    if connector is not None:
        recipe["connector"] = connector
    torch.manual_seed(0)
    return compose(recipe)


SYSTEMS = {
    "prefix": lambda: quickstart(),
    "crossattn": lambda: quickstart(crossattn=True),
    "qformer-lite": lambda: quickstart({"name": "qformer-lite", "queries": 8, "layers": 2}),
}


@pytest.fixture(scope="module", params=sorted(SYSTEMS))
def system(request):
    return SYSTEMS[request.param]()


# --- the maps ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["attention", "gradient"])
def test_every_method_gives_one_normalised_map_per_token_on_the_patch_grid(system, method):
    captions = [e.captions[0] for e in EXAMPLES]
    found = explain(system, [e.image for e in EXAMPLES], method, captions=captions)
    layers = 2 if method == "attention" else 1  # both quickstart decoders have 2 layers of 4 heads
    heads = 4 if method == "attention" else 1
    for explanation, caption in zip(found, captions):
        ids = system.tokenize([caption], 64)[2][0]
        tokens = int((ids != -100).sum()) - 1  # the caption's tokens, its EOS left out
        assert explanation.caption == caption and "".join(explanation.tokens).strip() == caption
        assert [w.text for w in explanation.words] == caption.split()
        assert explanation.maps.shape == (tokens, layers, heads, 8, 8) and explanation.grid == (8, 8)
        assert (explanation.maps >= 0).all()
        for maps in (explanation.token_maps(), explanation.word_maps(), explanation.token_maps(layer=-1, head=0)):
            assert torch.allclose(maps.sum((-2, -1)), torch.ones(maps.shape[0]), atol=1e-5)
        assert explanation.word_maps().shape == (len(caption.split()), 8, 8)
        x, y = explanation.peak(0)
        assert 0 <= x <= 64 and 0 <= y <= 64  # in the original image's pixels (64 x 64, squashed as is)


def test_the_greedy_caption_is_explained_by_default_and_system_explain_takes_one_image(system):
    image = EXAMPLES[0].image
    one = system.explain(image, "gradient")
    assert isinstance(one, Explanation) and one.caption == system.caption([image], do_sample=False, num_beams=1)[0]
    as_json = json.loads(json.dumps(one.to_json(per_layer=True)))
    assert as_json["grid"] == [8, 8] and as_json["method"] == "gradient" and as_json["image_size"] == [64, 64]
    for word in as_json["words"]:
        assert np.isclose(np.sum(word["map"]), 1, atol=1e-3) and len(word["layers"]) == 1


def test_bad_calls_are_refused_clearly(system):
    assert explain(system, [], "attention") == []
    with pytest.raises(ValueError, match="unknown method 'saliency'"):
        explain(system, [EXAMPLES[0].image], "saliency")
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        explain(system, [EXAMPLES[0].image, EXAMPLES[1].image], "gradient", captions=["a red circle"])


def test_pooled_and_stacked_tokens_hold_exactly_the_patches_they_are_made_of():
    from prefixcap.connectors.linear import TokenReducer

    tokens = torch.randn(2, 64, 5)
    for mode in ("avg", "pixel-shuffle", "none"):
        reducer = TokenReducer(mode, 2, 64, 5)
        weights = reducer.source_weights()  # (K, N)
        assert weights.shape == (reducer.out_tokens, 64) and torch.allclose(weights.sum(1), torch.ones(len(weights)))
        if mode == "avg":  # the weights are the pooling
            assert torch.allclose(weights @ tokens, reducer(tokens), atol=1e-6)
        # each output token changes with exactly the patches its weights name
        for patch in (0, 9, 27, 63):
            moved = tokens.clone()
            moved[:, patch] += 1
            changed = (reducer(moved) != reducer(tokens)).any(-1).any(0)
            assert torch.equal(changed, weights[:, patch] > 0), (mode, patch)


def test_qformer_queries_spread_over_the_patches_as_they_attend_and_differ_by_image():
    system = SYSTEMS["qformer-lite"]()
    with torch.no_grad():
        tokens = system.encoder(system.encoder.preprocess([e.image for e in EXAMPLES]))
        weights = system.connector.source_weights(tokens)
    assert weights.shape == (3, 8, 64) and torch.allclose(weights.sum(-1), torch.ones(3, 8), atol=1e-5)
    assert not torch.allclose(weights[0], weights[1])
    with torch.no_grad():  # reading the weights changes nothing the connector computes (but the kernel: rounding)
        assert torch.allclose(system.connector(tokens), system.connector(tokens, []), atol=1e-5)


def test_a_connector_that_does_not_say_where_its_tokens_come_from_still_explains_by_gradient():
    class Opaque(Connector):  # a third-party connector implementing only what a connector must
        def __init__(self, inner):
            super().__init__(inner.in_dim, inner.out_dim)
            self.inner = inner

        def output_tokens(self, in_tokens):
            return self.inner.output_tokens(in_tokens)

        def forward(self, tokens):
            return self.inner(tokens)

    system = SYSTEMS["prefix"]()
    system.connector = Opaque(system.connector)
    with pytest.raises(ExplainError, match="Connector.source_weights.*--method gradient"):
        explain(system, [EXAMPLES[0].image], "attention")
    assert explain(system, [EXAMPLES[0].image], "gradient")[0].grid == (8, 8)


def test_rollout_multiplies_the_layers_with_the_residual_path():
    identity = torch.eye(3)[None, None]  # (B, heads, N, N): every token reads itself
    assert torch.allclose(attention_rollout([identity, identity]), torch.eye(3)[None])
    everything_to_first = torch.zeros(1, 1, 3, 3)
    everything_to_first[..., 0] = 1
    one = attention_rollout([everything_to_first], residual=0.5)
    assert torch.allclose(one[0], torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]]))
    two = attention_rollout([everything_to_first, everything_to_first], residual=0.5)
    assert torch.allclose(two[0], one[0] @ one[0]) and torch.allclose(two.sum(-1), torch.ones(1, 3))


def test_eager_attention_reaches_every_config_of_the_pair_and_restores_them():
    system = SYSTEMS["crossattn"]()
    model = system.encoder.model
    configs = {id(m.config): m.config for m in system.hf_model.modules() if hasattr(m, "config")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    with eager_attention(system.hf_model):
        assert {c._attn_implementation for c in configs.values()} == {"eager"}
        assert len(model(pixel_values=torch.zeros(1, 3, 64, 64), output_attentions=True).attentions) == 4
    assert {k: c._attn_implementation for k, c in configs.items()} == before


def test_a_word_is_its_tokens_and_its_peak_is_where_its_map_is_highest():
    words = _words(["a", " red", " tri", "angle", ",", " a", " blue"])
    assert [(w.text, w.tokens) for w in words] == [("a", [0]), ("red", [1]), ("triangle,", [2, 3, 4]), ("a", [5]),
                                                   ("blue", [6])]  # fmt: skip
    grid = np.zeros((4, 4))
    grid[1, 2] = 1.0
    assert peak(grid) == pytest.approx((2.5, 1.5), abs=1 / 8)  # the centre of the cell (x, y)
    grid[1, 3] = 1.0  # split evenly between two cells: between them
    assert peak(grid) == pytest.approx((3.0, 1.5), abs=1 / 8)
    grid[:] = 0
    grid[2:4, 0:2] = 0.25  # a token spread over 2x2 patches: the middle of the four
    assert peak(grid) == pytest.approx((1.0, 3.0), abs=1 / 8)


def test_peaks_are_given_in_the_original_image_through_the_resize_mode():
    grid = torch.zeros(1, 1, 1, 8, 8)
    grid[..., 4, 6] = 1  # the cell whose centre is (52, 36) of the 64-pixel input
    wide = Explanation("a", ["a"], _words(["a"]), "gradient", grid, image_size=(200, 100), input_size=64,
                       placement=(0.0, 16.0, 64.0, 48.0), resize="letterbox")  # fmt: skip
    x, y = wide.peak(0)
    assert x == pytest.approx(52 * 200 / 64, abs=2) and y == pytest.approx((36 - 16) * 100 / 32, abs=2)


def test_shape_words_name_each_noun_s_shape_in_any_order_only_for_a_correct_caption():
    index, example = next((i, e) for i in range(50) if len((e := SHAPES.example("test", i)).scene) == 2)
    left, right = example.scene
    words = f"a {right.phrase()} to the right of a {left.phrase()}".split()
    assert shape_words(words, example.scene) == [(words.index(right.kind), 1), (len(words) - 1, 0)]
    assert shape_words(f"a {left.phrase()}".split(), example.scene) == []  # a shape missing: nothing to place
    boxes = SHAPES.word_boxes("test", index, words)
    x0, y0, x1, y1 = example.boxes[1]
    assert boxes[0] == (words.index(right.kind), (x0, y0, x1 + 1, y1 + 1))


# --- the trained quickstart -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(quickstart_short):
    return load(quickstart_short.run_dir)


@pytest.mark.parametrize("method", ["attention", "gradient"])
def test_on_one_shape_images_the_trained_quickstart_points_at_the_shape(trained, method):
    """The shape's noun peaks inside its box on every one-shape test image (of the first 40) whose caption is right."""
    shown = 0
    for i in range(40):
        example = SHAPES.example("test", i)
        if len(example.scene) != 1:
            continue
        found = explain(trained, [example.image], method)[0]
        placed = SHAPES.word_boxes("test", i, [w.text for w in found.words])
        if not placed:
            continue  # a wrong caption names no shape to point at
        (word, (x0, y0, x1, y1)), = placed
        x, y = found.peak(word)
        assert x0 <= x <= x1 and y0 <= y <= y1, (i, found.caption, (x, y), (x0, y0, x1, y1))
        shown += 1
    assert shown >= 5


def test_the_trained_quickstart_wins_the_pointing_game_far_above_chance(trained):
    """Measured after 300 steps (100 test images, 158 shape nouns in 80 right captions): attention 0.59, gradient
    0.53, chance 0.044, the centre 0.063; without rollout 0.30 and 0.42. After the quickstart's 2,000 steps `prefixcap
    bench` measures both above 0.9 (docs/explain.md)."""
    found = pointing_game(trained, SHAPES, "test", images=100)
    assert found["words"] >= 120 and found["chance"] < 0.06 and found["centre"] < 0.15, found
    assert set(found["accuracy"]) == {"attention", "gradient"} and len(found["attention_by_layer"]) == 2
    for method, accuracy in found["accuracy"].items():
        assert accuracy >= 0.42 and accuracy >= 8 * found["chance"], (method, found)
        assert accuracy > found["accuracy_without_rollout"][method], (method, found)


@pytest.mark.parametrize("method", ["attention", "gradient"])
def test_a_wide_image_is_letterboxed_and_its_maps_are_drawn_back_onto_it(trained, method):
    """A one-shape picture pasted on the left of a wider canvas of its own grey, letterboxed with that grey (the
    quickstart never saw padding of another colour): the peak lands on the shape, in the wide image's own pixels."""
    index, example = next((i, e) for i in range(40) if len((e := SHAPES.example("test", i)).scene) == 1)
    canvas = Image.new("RGB", (80, 64), (235, 235, 235))
    canvas.paste(example.image, (0, 0))
    trained.encoder.set_preprocessing(resize="letterbox", fill=(235 / 255,) * 3)
    try:
        found = trained.explain(canvas, method)
    finally:
        trained.encoder.set_preprocessing()
    assert found.resize == "letterbox" and found.image_size == (80, 64) and found.placement == (0, 6, 64, 57)
    (word, (x0, y0, x1, y1)), = SHAPES.word_boxes("test", index, [w.text for w in found.words])
    x, y = found.peak(word)
    assert x0 <= x <= x1 and y0 <= y <= y1, (found.caption, (x, y), (x0, y0, x1, y1))


def test_explain_command_writes_a_png_and_a_json_per_image_and_an_error_row_for_a_bad_one(quickstart_short,
                                                                                         tmp_path):  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    EXAMPLES[0].image.save(images / "one.png")
    Image.new("RGB", (120, 60), "white").save(images / "wide.png")
    (images / "broken.png").write_bytes(b"not an image")
    (images / "one.explain.png").write_bytes(b"an input named like an output")
    # the folder is the input and the output: what it holds is read, never written over
    result = run_cli("explain", str(quickstart_short.run_dir), str(images), "--out", str(images), "--per-layer")
    assert result.returncode == 1, result.stderr
    assert "broken.png: error: not an image" in result.stdout and "explained 2 of 4 images; 2 errors" in result.stderr
    assert (images / "one.explain.png").read_bytes() == b"an input named like an output"
    record = json.loads((images / "one-2.explain.json").read_text())
    assert record["image"] == str(images / "one.png") and record["grid"] == [8, 8]
    assert record["aggregation"] == {"layers": "mean", "heads": "mean"} and record["rollout"] is True
    for word in record["words"]:
        assert np.isclose(np.sum(word["map"]), 1, atol=1e-3) and len(word["layers"]) == 2
    with Image.open(images / "one-2.explain.png") as png:
        assert png.size[0] > 600  # the image and a panel per word
    wide = json.loads((images / "wide.explain.json").read_text())
    assert wide["image_size"] == [120, 60] and wide["resize"] == "squash"
    # an output name planted in the output folder as a link elsewhere: replaced, never written through
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("not to be written")
    for name in ("one.explain.png", "one.explain.json"):
        (out / name).symlink_to(victim)
    assert run_cli("explain", str(quickstart_short.run_dir), str(images / "one.png"), "--out", str(out)).returncode == 0
    assert victim.read_text() == "not to be written" and not any(p.is_symlink() for p in out.iterdir())


def test_explain_command_needs_a_run_and_a_path(quickstart_short, tmp_path):
    result = run_cli("explain", str(quickstart_short.run_dir), "--out", str(tmp_path))
    assert result.returncode == 2 and "at least one PATH" in result.stderr

"""Matching figures: recall@k with repeated captions and ties, hard-negative accuracy, the shapes world's hard
negatives, and what `prefixcap bench` measures with them (prefixcap.retrieval, prefixcap.bench)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from prefixcap import compose
from prefixcap.matching import measure_matching
from prefixcap.bench_report import MATCHING_ROWS, matching, matching_markdown
from prefixcap.data import JsonlOptions, ShapesOptions
from prefixcap.data.shapes import ShapesSource, minimal_edits, parse_caption, references
from prefixcap.data.sources import JsonlSource
from prefixcap.interfaces import DatasetSource
from prefixcap.metrics.clipscore import ClipScorer
from prefixcap.retrieval import hard_negative_accuracy, padded, recall_at_k, retrieval
from prefixcap.score import score_candidates

# --- recall@k -----------------------------------------------------------------------------------------------------


def test_recall_counts_any_equal_caption_and_gives_ties_to_the_wrong_answer():
    # Images 0 and 1 share caption "a"; texts are "a" and "b".
    matrix = np.array([[0.9, 0.1],  # image 0: its caption first
                       [0.2, 0.8],  # image 1: "b" above its caption
                       [0.7, 0.7]])  # image 2 ("b"): a tie with the wrong text is a miss  # fmt: skip
    found = retrieval(matrix, ["a", "a", "b"], ["a", "b"], ks=(1, 2))
    # text "a" is answered by image 0 (0.9 beats image 2's 0.7); text "b" by image 2, but image 1 scores 0.8
    assert found == {"i2t_r1": pytest.approx(1 / 3), "i2t_r2": 1.0, "t2i_r1": 0.5, "t2i_r2": 1.0}
    alike = retrieval(np.zeros((3, 2)), ["a", "a", "b"], ["a", "b"], ks=(1, 2))
    # all tied: each right answer ranks below every wrong one ("b" has two wrong images, "a" one)
    assert alike == {"i2t_r1": 0.0, "i2t_r2": 1.0, "t2i_r1": 0.0, "t2i_r2": 0.5}


def test_recall_equals_a_sort_that_puts_wrong_answers_first_among_equals():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows, columns = rng.integers(2, 9, size=2)
        matrix = rng.integers(0, 4, size=(rows, columns)).astype(float)  # few values: many ties
        column_ids = rng.integers(0, 3, size=columns).tolist()
        row_ids = [column_ids[c] for c in rng.integers(0, columns, size=rows)]  # every row has a right answer
        expected = {}
        for k in (1, 3):
            hits = 0
            for r in range(rows):
                right = [row_ids[r] == c for c in column_ids]
                order = sorted(range(columns), key=lambda c: (-matrix[r, c], right[c]))  # wrong before right on ties
                hits += any(right[c] for c in order[:k])
            expected[k] = hits / rows
        assert recall_at_k(matrix, row_ids, column_ids, (1, 3)) == pytest.approx(expected)


def test_recall_ranks_nan_last_and_refuses_a_query_without_an_answer():
    matrix = np.array([[np.nan, 0.5], [0.3, np.nan]])
    assert recall_at_k(matrix, ["a", "a"], ["a", "b"], (1,)) == {1: 0.5}  # image 1's NaN wrong answer beats nothing
    with pytest.raises(ValueError, match="row 1 matches no column"):
        recall_at_k(np.zeros((2, 2)), ["a", "c"], ["a", "b"])
    with pytest.raises(ValueError, match=r"a \(2, 3\) score matrix was expected"):
        recall_at_k(np.zeros((2, 2)), ["a", "b"], ["a", "b", "c"])


# --- hard negatives -----------------------------------------------------------------------------------------------


def test_hard_negative_accuracy_needs_the_truth_strictly_above_every_negative():
    negatives = padded([[0.5, 0.2], [0.9], [0.1, 0.3, 0.8], [0.4]])  # ragged: NaN pads
    assert negatives.shape == (4, 3) and np.isnan(negatives[1, 1:]).all()
    # won, tie (a miss), won, NaN truth (a miss)
    assert hard_negative_accuracy(np.array([0.6, 0.9, 0.81, np.nan]), negatives) == 0.5
    with pytest.raises(ValueError, match="example 1 has no negative"):
        hard_negative_accuracy(np.array([1.0, 1.0]), padded([[0.5], []]))
    with pytest.raises(ValueError, match=r"expected \(N,\) true scores and \(N, M\)"):
        hard_negative_accuracy(np.array([1.0, 1.0]), np.zeros((3, 1)))


def test_shapes_hard_negatives_are_other_scenes_one_edit_away_and_deterministic():
    for options in (ShapesOptions(test_size=60), ShapesOptions(test_size=60, sizes=True, seed=5)):
        source, again = ShapesSource(options), ShapesSource(options)
        for index, scene in enumerate(source.scenes("test")):
            edits = source.hard_negatives("test", index)
            assert edits == again.hard_negatives("test", index)  # a fresh source gives the same, in the same order
            assert len(set(edits)) == len(edits) and references(scene)[0] not in edits
            stated = [parse_caption(e) for e in edits]
            assert all(s is not None and s != scene for s in stated)  # the oracle reads each as another scene
            assert len(set(stated)) == len(stated)
            for other in stated:  # one colour, one kind, or two shapes swapped: never more
                assert len(other) == len(scene)
                changed = [i for i in range(len(scene)) if other[i] != scene[i]]
                if len(changed) == 1:
                    i = changed[0]
                    assert sum(a != b for a, b in zip(other[i], scene[i])) == 1, (scene, other)
                else:
                    i, j = changed
                    assert (other[i], other[j]) == (scene[j], scene[i]), (scene, other)
            # every other colour (3) and kind (2) of every shape, and every swap of two different shapes
            swaps = sum(scene[i] != scene[j] for i in range(len(scene)) for j in range(i + 1, len(scene)))
            assert len(edits) == 5 * len(scene) + swaps


def test_minimal_edits_of_a_scene_of_equal_shapes_have_no_swap():
    scene = parse_caption("a red circle left of a red circle")
    edits = minimal_edits(scene)
    assert len(edits) == 10 and scene not in edits  # 2 x 3 colours + 2 x 2 kinds; the swap is the scene itself


def test_a_data_set_without_hard_negatives_says_so(tmp_path):
    with pytest.raises(NotImplementedError, match="the JsonlSource data set has no hard negatives"):
        JsonlSource(JsonlOptions(train=str(tmp_path / "train.jsonl"))).hard_negatives("train", 0)
    with pytest.raises(IndexError, match="test has 4 examples; there is no example 4"):
        ShapesSource(ShapesOptions(test_size=4)).hard_negatives("test", 4)


# --- what bench measures ------------------------------------------------------------------------------------------


class NoNegatives(ShapesSource):
    """The shapes world without its hard negatives: a data set that offers none."""

    hard_negatives = DatasetSource.hard_negatives


@pytest.fixture(scope="module")
def clip():
    return ClipScorer.from_pretrained("prefixcap/shapes-clip")


@pytest.fixture(scope="module")
def tiny_systems():
    torch.manual_seed(0)
    with_itc = compose({**TINY, "losses": [{"name": "caption-ce"}, {"name": "itc", "dim": 16}]})
    return with_itc, compose(TINY)


def test_bench_matching_scores_every_image_against_every_caption_and_its_own_edits(tiny_systems, clip):
    system, _ = tiny_systems
    source = ShapesSource(ShapesOptions(test_size=12))
    found = measure_matching(system, source, 10, clip)
    assert (found["split"], found["images"], found["hard_negative_images"]) == ("test", 10, 10)
    # The same figures from the public scoring API on the same images: the groups, rows and captions line up.
    images = [source.example("test", i).image for i in range(10)]
    captions = [references(scene)[0] for scene in list(source.scenes("test"))[:10]]
    texts = list(dict.fromkeys(captions))
    assert found["captions"] == len(texts)
    scores = system.score(images, texts)
    contests = [[c, *source.hard_negatives("test", i)] for i, c in enumerate(captions)]
    assert found["negatives_per_image"] == pytest.approx(np.mean([len(c) - 1 for c in contests]))
    pairs = score_candidates(system, images, contests)
    for kind in ("generative", "contrastive"):
        expected = retrieval(scores.of(kind), [texts.index(c) for c in captions], range(len(texts)))
        expected["hard_negative_accuracy"] = hard_negative_accuracy(np.array([p[kind][0] for p in pairs]),
                                                                    padded([p[kind][1:] for p in pairs]))  # fmt: skip
        assert found["scores"][kind] == pytest.approx(expected), kind
    # The shapes CLIP learnt this world: it finds each image's caption among the others.
    reference = found["reference"]
    assert reference["model"] == "prefixcap/shapes-clip" and reference["scores"]["i2t_r5"] >= 0.9


def test_bench_matching_says_why_a_figure_is_missing(tiny_systems):
    with_itc, plain = tiny_systems
    source = NoNegatives(ShapesOptions(test_size=0, val_size=6))  # no test split: the val split is held out
    entries = [("itc", measure_matching(with_itc, source, 100)), ("plain", measure_matching(plain, source, 100))]
    section = matching(entries, clip_model=None)
    assert (section["split"], section["images"], section["negatives_per_image"]) == ("val", 6, None)
    columns = {(c["label"], c["score"]): c for c in section["columns"]}
    assert list(columns) == [("itc", "generative"), ("itc", "contrastive"), ("plain", "generative"),
                             ("plain", "contrastive"), ("CLIP", "cosine")]  # fmt: skip
    for (label, kind), column in columns.items():
        assert set(column["values"]) == {key for key, _ in MATCHING_ROWS}
        for key, value in column["values"].items():  # a figure, or the reason there is none
            assert (value is None) == (key in column["why"]), (label, kind, key)
    assert 0 <= columns["itc", "contrastive"]["values"]["i2t_r1"] <= 1
    assert "no hard negatives" in columns["itc", "generative"]["why"]["hard_negative_accuracy"]
    assert "itc loss" in columns["plain", "contrastive"]["why"]["i2t_r1"]
    assert columns["CLIP", "cosine"]["why"]["i2t_r1"] == "eval.clip_model is null"
    table = "\n".join(matching_markdown(section))
    assert "| | itc generative | itc contrastive | plain generative | plain contrastive | CLIP cosine (reference) |" in table
    assert "| hard-negative accuracy | n/a: the NoNegatives data set has no hard negatives" in table
    assert "first 6 held-out (val) images" in table
    nothing = matching([("itc", measure_matching(with_itc, NoNegatives(ShapesOptions(test_size=0, val_size=0)), 100))],
                       clip_model="auto")  # fmt: skip
    assert "images" not in nothing and all(c["values"]["i2t_r1"] is None for c in nothing["columns"])
    assert matching_markdown(nothing)[-1] == "n/a: the data has no readable held-out images"

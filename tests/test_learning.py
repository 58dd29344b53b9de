"""`prefixcap run` learns, and learns from the right pairs.

Each system trains on 2,000 shapes images for 300 steps (the bundled recipes, shortened) and must cut its training
loss by at least half and state most of the 200 held-out scenes exactly. The control trains the same recipe on the
same images with every training caption moved to another image (val and test keep their true captions): it learns
the captions' language but no scene. So a trainer that does not update the weights (a zero learning rate, frozen
parameters) or that pairs an image with another's caption (the data path, about to be streamed through worker
processes, is where that bug would come from) fails here.

Measured on the 2-core CPU, the recipes training itc: quickstart 74.5% of held-out scenes exact after 300 steps,
from JSONL files the same losses to the bit; the cross-attention baseline 72.5%; both controls 0%, with a held-out
loss 7.5x and 6.1x the real runs'.
"""

from __future__ import annotations

import pytest
from learning import (QUICKSTART_ACCURACY, assert_learned, assert_learned_no_scene, exact_scenes, judging, jsonl,
                      losses)

from conftest import learning_cache, train_quietly


def test_quickstart_learns_to_state_held_out_scenes(quickstart_short):
    assert_learned(quickstart_short, QUICKSTART_ACCURACY)
    # the run's own metric is the same oracle
    assert quickstart_short.metrics["test_oracle_accuracy"] == exact_scenes(quickstart_short.run_dir)


def test_a_recipe_reading_jsonl_files_trains_on_the_same_pairs(quickstart_short, shapes_files, tmp_path_factory):
    """The same images and captions from PNG files and a JSONL index: the same run, loss for loss. 100 steps (over
    three epochs of the 2,000 images, each with its references drawn afresh) already halve the loss; the 200 after
    them are the quickstart's above, which states the scenes."""
    root = tmp_path_factory.mktemp("jsonl")
    overrides = jsonl(shapes_files, "train.jsonl")
    result = train_quietly("quickstart", overrides, root / "run", learning_cache(tmp_path_factory), stop_after=100)
    assert result.steps == 100 and losses(result)[-1] <= losses(result)[0] / 2
    assert losses(result) == pytest.approx(losses(quickstart_short)[:100], rel=1e-6)


def test_quickstart_on_shuffled_pairs_learns_no_scene(quickstart_short, shapes_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffled")
    overrides = jsonl(shapes_files, "shuffled.jsonl")
    control = train_quietly("quickstart", overrides, root / "run", learning_cache(tmp_path_factory))
    assert losses(control)[-1] <= losses(control)[0] / 2  # it does learn: the captions' words and grammar
    assert_learned_no_scene(control, quickstart_short)
    for kind, figures in judging(control.run_dir).items():  # nor does it learn to match images and captions
        assert figures["i2t_r1"] <= 0.15 and figures["t2i_r1"] <= 0.15 and figures["hard_negative_accuracy"] <= 0.2, (kind, figures)


def test_quickstart_learns_to_judge_captions(quickstart_short):
    """The same 300 steps, trained with itc and blank images, make a judge of captions: on 100 held-out images it
    retrieves each image's caption among theirs and tells the true caption from one-word edits of it (a colour, a
    shape or the order changed; about 12 an image, all of which it must beat), by both scores; and the --min-score it
    calibrated on the 50 validation images lets through nearly all true test captions. Measured: generative i2t
    R@1 0.96, t2i 1.0, hard negatives 0.85, 99% of true captions at or above the threshold; contrastive 0.96, 0.91,
    0.76 and 98%. The control above: R@1 at most 0.05, hard negatives at most 0.04."""
    found = judging(quickstart_short.run_dir)
    assert set(found) == {"generative", "contrastive"}
    for kind, hard_negative in (("generative", 0.75), ("contrastive", 0.65)):
        figures = found[kind]
        assert figures["i2t_r1"] >= 0.8 and figures["t2i_r1"] >= 0.8, (kind, figures)
        assert figures["hard_negative_accuracy"] >= hard_negative, (kind, figures)
        assert figures["true_above_min"] >= 0.9 and figures["calibrated_on"] == 50, (kind, figures)

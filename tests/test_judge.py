"""`prefixcap caption --rerank K --min-score S`: the system keeps the candidate it scores best and marks the captions it
doubts; the calibrated default travels with the saved system and is read as a stranger's file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixcap import compose, load
from prefixcap.errors import SavedSystemError
from prefixcap.judge import Judge, JudgeError
from prefixcap.score import TorchScorer

from conftest import CAPTIONS, IMAGES, TINY, fit_batch, run_cli

WITH_ITC = {**TINY, "losses": [{"name": "caption-ce"}, {"name": "itc", "dim": 16}]}
CALIBRATION = {"contrastive": {"min_score": 0.25, "quantile": 0.05, "pairs": 3},
               "generative": {"min_score": -0.5, "quantile": 0.05, "pairs": 3}}  # fmt: skip


@pytest.fixture(scope="module")
def system():
    torch.manual_seed(0)
    system = compose(WITH_ITC)
    fit_batch(system, IMAGES, CAPTIONS, 100)
    system.score_calibration = CALIBRATION
    return system


@pytest.fixture(scope="module")
def saved(system, tmp_path_factory) -> Path:
    return system.save(tmp_path_factory.mktemp("judged") / "final")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    for name, image in zip(("red", "navy", "white"), IMAGES):
        image.save(folder / f"{name}.png")
    return [str(folder / f"{name}.png") for name in ("red", "navy", "white")]


def test_rerank_keeps_the_candidate_the_system_scores_best(system):
    judge = Judge(TorchScorer(system), rerank=4)
    torch.manual_seed(1)
    judged = judge.caption(system, IMAGES, {})
    torch.manual_seed(1)  # the same samples again, to check the choice against
    candidates = judge.candidates(system, IMAGES, {})
    assert [c[0] for c in candidates] == system.caption(IMAGES)  # the greedy caption is always a candidate
    assert all(1 <= len(c) <= 4 and len(set(c)) == len(c) for c in candidates)
    assert any(len(c) > 1 for c in candidates)  # sampling offered something else
    for one, own, scores in zip(judged, candidates, judge.score(IMAGES, candidates)):
        best = int(np.argmax(scores["likelihood"] + scores["contrastive"]))  # the default ranking
        assert one.caption == own[best] and judge.kind == "contrastive"
        assert one.score == pytest.approx(scores["contrastive"][best]) and one.unsure is None  # nothing flagged


def test_min_score_flags_exactly_the_captions_below_it(saved, image_files):
    done = run_cli("caption", str(saved), *image_files, "--rerank", "3", "--rank-by", "generative")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    scores = sorted(r["score"] for r in rows)
    assert all(isinstance(r["unsure"], bool) for r in rows)  # the calibrated default applies whenever scores exist
    middle = (scores[0] + scores[1]) / 2
    flagged = run_cli("caption", str(saved), *image_files, "--min-score", str(middle), "--rank-by", "generative")
    rows = [json.loads(line) for line in flagged.stdout.splitlines()]
    assert [r["unsure"] for r in rows] == [r["score"] < middle for r in rows]
    assert sum(r["unsure"] for r in rows) >= 1 and f"{sum(r['unsure'] for r in rows)} unsure" in flagged.stderr


def test_min_score_auto_is_the_calibration_saved_with_the_system(saved, image_files, tmp_path):
    done = run_cli("caption", str(saved), image_files[0], "--min-score", "auto", "--format", "text")
    assert done.returncode == 0, done.stderr
    assert "(contrastive score below 0.25)" in done.stderr
    cells = done.stdout.rstrip("\n").split("\t")
    assert len(cells) in (3, 4) and (cells[3:] == ["unsure"]) == (float(cells[2]) < 0.25)
    torch.manual_seed(0)
    plain = compose(WITH_ITC).save(tmp_path / "uncalibrated")
    refused = run_cli("caption", str(plain), image_files[0], "--min-score", "auto")
    assert refused.returncode == 2 and "no calibrated contrastive --min-score" in refused.stderr
    for bad in ("nan", "inf", "high"):
        wrong = run_cli("caption", str(saved), image_files[0], "--min-score", bad)
        assert wrong.returncode == 2 and "neither a number nor auto" in wrong.stderr


def test_a_judge_refuses_a_score_the_system_does_not_have():
    torch.manual_seed(0)
    with pytest.raises(JudgeError, match="no contrastive score"):
        Judge(TorchScorer(compose(TINY)), kind="contrastive")
    assert Judge(TorchScorer(compose(TINY))).kind == "generative"
    with pytest.raises(JudgeError, match="no contrastive score"):
        Judge(TorchScorer(compose(TINY)), rank_by="contrastive")


def test_the_calibration_comes_back_with_the_system(saved, system):
    assert load(saved).score_calibration == CALIBRATION


@pytest.mark.parametrize("bad, complaint", [
    ({"contrastive": {"min_score": "0.25", "quantile": 0.05, "pairs": 3}}, "contrastive.min_score"),
    ({"contrastive": {"min_score": float("nan"), "quantile": 0.05, "pairs": 3}}, "finite"),
    ({"contrastive": {"min_score": 0.2, "quantile": 0.05, "pairs": True}}, "contrastive.pairs"),
    ({"contrastive": {"min_score": 0.2, "quantile": 0.05, "pairs": 3, "run": "x"}}, "contrastive.run"),
    ({"fluency": {"min_score": 0.2, "quantile": 0.05, "pairs": 3}}, "fluency"),
    ("0.25", "score_calibration"),
])  # fmt: skip
def test_a_hostile_calibration_is_refused_on_load(saved, tmp_path, bad, complaint):
    import shutil

    copy = Path(shutil.copytree(saved, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["score_calibration"] = bad
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SavedSystemError, match=complaint):
        load(copy)

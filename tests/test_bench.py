"""`prefixcap bench`: one short comparison of the two presets end to end, and the protocol's refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import run_cli

from prefixcap import CompositionError
from prefixcap.bench import BenchError, Target, bench, plan, time_to_target
from prefixcap.bench_report import COLUMNS
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource
from prefixcap.data.loader import epoch_order, pick_reference

SMALL = ["data.train_size=48", "data.val_size=6", "data.test_size=6"]
STEPS, BATCH, SEED = 4, 16, 3  # 4 x 16 = 64 > 48: the second epoch (a new order) starts inside the run


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFIXCAP_CACHE", str(out / "cache"))
        result = bench(["crossattn", "prefix"], out=out, steps=STEPS, batch_size=BATCH, seed=SEED, eval_every=2,
                       gen_images=2, overrides=SMALL)  # fmt: skip
    return result, out


def expected_fingerprint() -> str:
    """What the run must have trained on, rebuilt from the seed alone: micro-batch k takes positions k*B..k*B+B-1 of
    the endless stream of per-epoch permutations, and each image one reference drawn per epoch."""
    source = ShapesSource(ShapesOptions(train_size=48))
    references = [e.captions for e in source.examples("train")]
    digest = hashlib.sha256()
    for k in range(STEPS):
        ids, captions = [], []
        for pos in range(k * BATCH, (k + 1) * BATCH):
            epoch, offset = divmod(pos, len(references))
            i = epoch_order(SEED, epoch, len(references))[offset]
            ids.append(i)
            captions.append(pick_reference(SEED, epoch, i, references[i]))
        digest.update(json.dumps([ids, captions]).encode())
    return digest.hexdigest()


def test_bench_json_has_every_figure_for_every_entry(report):
    result, out = report
    saved = json.loads((out / "bench.json").read_text())
    assert saved["protocol"] == result["protocol"] and [e["label"] for e in saved["entries"]] == ["crossattn", "prefix"]
    env = saved["environment"]
    assert {"torch", "transformers", "peft", "onnxruntime"} <= env["versions"].keys()
    assert env["device"]["type"] == "cpu" and env["machine"]["cores"] >= 1 and env["git_revision"]
    for entry in saved["entries"]:
        values, why = entry["values"], entry["why"]
        for key, _, _ in COLUMNS:  # a figure, or the reason there is none: never a silent gap
            assert isinstance(values[key], (int, float)) or why[key], (entry["label"], key)
        assert values["steps"] == STEPS and values["train_seconds"] > 0
        assert 0 < values["train_samples_per_s"] and 0 < values["train_samples_per_s_with_data"]
        assert values["train_samples_per_s_with_data"] <= values["train_samples_per_s"]
        assert values["caption_latency_p50_ms"] <= values["caption_latency_p95_ms"]
        assert values["peak_train_memory_mb"] > 50 and values["checkpoint_mb"] > 0
        assert 0 < values["trainable_params"] < values["total_params"]
        # the quality figures are the entry's own run's held-out metrics, as `prefixcap run` wrote them
        run_metrics = json.loads((out / entry["label"] / "metrics.json").read_text())
        for name in ("oracle_accuracy", "clip_s", "ref_clip_s", "cider", "bleu4"):
            assert values[name] == run_metrics[f"test_{name}"], (entry["label"], name)
        assert 0 <= values["oracle_accuracy"] <= 1 and 0 <= values["clip_s"] <= 2.5  # CLIP-S is 2.5 * max(cos, 0)
        # Four steps reach nothing: the reason says so, with the best value seen.
        assert values["time_to_target_s"] is None and "not reached in 4 steps" in why["time_to_target_s"]
    ratio = saved["ratios"]["prefix"]
    first, second = (e["values"] for e in saved["entries"])
    assert ratio["train_samples_per_s"] == pytest.approx(second["train_samples_per_s"] / first["train_samples_per_s"])
    md = (out / "bench.md").read_text()
    assert "| | crossattn | prefix |" in md and "train samples/s (data excluded)" in md
    assert (out / "bench.png").stat().st_size > 10_000


def test_bench_reports_matching_for_each_system_and_score_beside_the_shapes_clip(report):
    from prefixcap.bench_report import MATCHING_ROWS, matching_table

    result, out = report
    section = json.loads((out / "bench.json").read_text())["matching"]
    assert section == result["matching"] and "matching" not in result["entries"][0]
    # the held-out test split (6 images at this size), each caption against its own minimal edits
    assert (section["split"], section["images"], section["hard_negative_images"]) == ("test", 6, 6)
    assert section["negatives_per_image"] >= 5 and section["why_no_hard_negatives"] is None
    assert result["protocol"]["matching_images"] == 100 and set(section["seconds"]) == {"crossattn", "prefix"}
    columns = [(c["label"], c["score"]) for c in section["columns"]]
    assert columns == [("crossattn", "generative"), ("crossattn", "contrastive"), ("prefix", "generative"),
                       ("prefix", "contrastive"), ("prefixcap/shapes-clip", "cosine")]  # fmt: skip
    for column in section["columns"]:  # both quickstarts train itc: every figure is there
        assert set(column["values"]) == {key for key, _ in MATCHING_ROWS} and not column["why"]
        assert all(0 <= v <= 1 for v in column["values"].values()), column
    md = (out / "bench.md").read_text()
    assert "### Matching: retrieval and hard negatives" in md and "first 6 held-out (test) images" in md
    assert "| | crossattn generative | crossattn contrastive | prefix generative | prefix contrastive | " \
           "prefixcap/shapes-clip cosine (reference) |" in md
    headers, body = matching_table(section)  # what `prefixcap bench` prints after its main table, and bench.md holds
    assert [row[0] for row in body] == [label for _, label in MATCHING_ROWS] and all(len(r) == 6 for r in body)
    assert "| " + " | ".join(body[-1]) + " |" in md and len(headers) == 5


def test_both_entries_trained_on_the_same_examples_in_the_same_order(report):
    result, _ = report
    data = [e["data"] for e in result["entries"]]
    assert data[0] == data[1]
    assert data[0]["seed"] == SEED and data[0]["batch_size"] == BATCH and data[0]["train_examples"] == 48
    assert data[0]["fingerprint"] == expected_fingerprint()
    assert result["protocol"]["data"] == {"name": "shapes", "train_size": 48, "val_size": 6, "test_size": 6}


def test_entries_must_see_images_at_one_resolution(tmp_path):
    other = tmp_path / "small-images.yaml"  # `tiny` SigLIP takes 32-pixel images; the quickstart's takes 64
    other.write_text("system: prefix\nencoder: {name: siglip, checkpoint: tiny}\nconnector: mlp\n"
                     "decoder: {name: smollm, checkpoint: tiny}\ndata: shapes\n")  # fmt: skip
    with pytest.raises(BenchError, match="different resolutions .*prefix 64 px, small-images 32 px"):
        plan(["prefix", str(other)])


def test_plan_keeps_each_entrys_file_lines_and_overrides():
    _, entries = plan(["prefix"], steps=3, overrides=["train.lr=2e-3"])
    recipe = entries[0].recipe
    assert "quickstart" in recipe.source and (recipe.train.lr, recipe.train.steps) == (2e-3, 3)  # its preset
    assert recipe.location(("encoder", "checkpoint")) == f"{recipe.source}:5"
    assert recipe.location(("train", "lr")) == "--set train.lr"
    assert recipe.location(("train", "steps")) == recipe.source  # the protocol's value, not the file's line
    with pytest.raises(CompositionError) as e:  # composed as planned: `<dict>` before the recipe kept its source
        plan(["prefix"], overrides=["connector.pool=avg", "connector.factor=16"])
    assert str(e.value).startswith(f"{recipe.source}:6: connector 'mlp': pool=avg factor=16")


def test_time_to_target_is_the_first_evaluation_that_reaches_it():
    history = [{"step": 1, "train_s": 0.5}, {"step": 2, "train_s": 1.0, "val": {"oracle_accuracy": 0.5}},
               {"step": 4, "train_s": 2.0, "val": {"oracle_accuracy": 0.92}},
               {"step": 6, "train_s": 3.0, "val": {"oracle_accuracy": 0.95}}]  # fmt: skip
    assert time_to_target(history, Target.parse("oracle_accuracy>=0.9")) == (
        {"time_to_target_s": 2.0, "steps_to_target": 4}, None)  # fmt: skip
    found, why = time_to_target(history, Target.parse("loss<=0.1"))
    assert found["time_to_target_s"] is None and why == "no validation loss was computed"
    found, why = time_to_target(history, Target.parse("oracle_accuracy >= 0.99"))
    assert why == "not reached in 6 steps (best 0.95, step 6)"


def test_bad_bench_options_are_one_line_errors():
    unknown = run_cli("bench", "--compare", "prefix,no-such-system")
    assert unknown.returncode == 2 and "'no-such-system' is neither a recipe nor a system" in unknown.stderr
    both = run_cli("bench", "--compare", "prefix", "--steps", "3", "--seconds", "2")
    assert both.returncode == 2 and "--steps or --seconds, not both" in both.stderr
    target = run_cli("bench", "--compare", "prefix", "--target", "accuracy=0.9")
    assert target.returncode == 2 and "expected METRIC>=VALUE" in target.stderr
    matching = run_cli("bench", "--compare", "prefix", "--matching-images", "0")
    assert matching.returncode == 2 and "--matching-images" in matching.stderr
    assert "Traceback" not in unknown.stderr + both.stderr + target.stderr + matching.stderr


def test_the_data_declares_its_headline_metric_and_bench_follows_it(tmp_path):
    from prefixcap.bench import data_headline, default_target
    from prefixcap.bench_report import markdown
    from prefixcap.interfaces import Metric
    from prefixcap.training.curves import plot_curves
    from prefixcap.training.events import Evaluated

    # The shapes world's own declaration drives the default target; a source that declares none gets no target.
    assert data_headline({"name": "shapes"}) is ShapesSource.headline
    assert str(default_target(ShapesSource.headline)) == "oracle_accuracy>=0.9"
    assert data_headline({"name": "jsonl", "train": "x.jsonl"}) is None and default_target(None) is None
    assert default_target(Metric("wer", "word error rate", higher_is_better=False, target=0.2)).reached(0.1)
    with pytest.raises(ValueError, match="plain identifier"):
        Metric("count accuracy", "x")

    # Any data set's metric, named by nothing in prefixcap: first row of the table, on the progress line, in the plot.
    counting = Metric("count_accuracy", "object-count accuracy", target=0.8, bounds=(0, 1))
    entry = {"label": "prefix", "values": {"count_accuracy": 0.75}, "why": {}}
    report = {"environment": {"device": {"name": "cpu", "type": "cpu"}, "versions": {"prefixcap": "0", "torch": "0"},
                              "git_revision": "x"},
              "protocol": {"data": {"name": "counting"}, "seed": 0, "batch_size": 1, "steps": 1,
                           "headline": {"name": "count_accuracy", "label": "object-count accuracy"}},
              "entries": [entry], "ratios": {}}  # fmt: skip
    assert "| object-count accuracy (test) | 0.750 |" in markdown(report)
    without = {**report, "protocol": {**report["protocol"], "headline": None}}
    assert "accuracy" not in markdown(without) and len(markdown(without).splitlines()) == 5 + len(COLUMNS)
    shown = Evaluated(3, {"loss": 1.0, "count_accuracy": 0.5, "bleu4": 0.1, "cider": 0.2}, counting).shown()
    assert list(shown) == ["loss", "count_accuracy", "cider"]
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "val": {"loss": 1.5, "count_accuracy": 0.5}}]
    plot_curves(history, tmp_path / "curves.png", counting)
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_bench_reports_the_pointing_game_for_each_system_or_why_it_has_no_figure(report):
    """Four steps write no right caption, so there is no word to point with: every cell says so. (The pointing game
    itself is tested on trained systems: tests/test_explain.py, tests/systems/test_crossattn_learning.py.)"""
    from prefixcap.bench_report import POINTING_ROWS, pointing_table

    result, out = report
    section = json.loads((out / "bench.json").read_text())["pointing"]
    assert section == result["pointing"] and "pointing" not in result["entries"][0]
    assert result["protocol"]["pointing_images"] == 200
    assert [c["label"] for c in section["columns"]] == ["crossattn", "prefix"]
    for column in section["columns"]:
        assert (column["split"], column["images"]) == ("test", 6)
        for key, _ in POINTING_ROWS:  # a figure, or the reason there is none: never a silent gap
            assert column["values"][key] is not None or "no word to point with" in column["why"][key], column
    headers, body = pointing_table(section)
    assert headers == ["crossattn", "prefix"] and [row[0] for row in body][:-1] == [label for _, label in POINTING_ROWS]
    md = (out / "bench.md").read_text()
    assert "### Pointing game" in md and "| " + " | ".join(body[0]) + " |" in md

"""`prefixcap score` and System.score: the generative and contrastive scores of (image, text) pairs, streamed."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from prefixcap import compose
from prefixcap.score import TorchScorer
from prefixcap.score_rows import EMPTY_TEXT, ScoreWriter, Texts, score_paths

from conftest import CAPTIONS, IMAGES, TINY, fit_batch, run_cli

WITH_ITC = {**TINY, "losses": [{"name": "caption-ce"}, {"name": "itc", "dim": 16}]}
TEXTS = ["a red square", "a dark blue square", "a white square", "red", "a square that is white and not red at all"]


@pytest.fixture(scope="module")
def system():
    torch.manual_seed(0)
    system = compose(WITH_ITC)
    fit_batch(system, IMAGES, CAPTIONS, 100)
    return system


@pytest.fixture(scope="module")
def saved(system, tmp_path_factory) -> Path:
    return system.save(tmp_path_factory.mktemp("scored") / "final")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for name, image in zip(("red", "navy", "white"), IMAGES):
        image.save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    return paths


# --- the scores ------------------------------------------------------------------------------------------------


def test_a_fitted_system_scores_each_image_highest_with_its_own_caption(system):
    # The contrastive score here; the generative one needs the blank images `prefixcap run` trains with (its baseline):
    # tests/test_learning.py holds both to the quickstart's held-out scenes.
    matrix = system.score(IMAGES, CAPTIONS).of("contrastive")
    assert matrix.shape == (3, 3)
    assert (matrix.argmax(1) == np.arange(3)).all(), matrix  # image -> its caption
    assert (matrix.argmax(0) == np.arange(3)).all(), matrix  # caption -> its image


def test_scores_do_not_depend_on_batching_or_on_the_other_texts(system):
    together = system.score(IMAGES, TEXTS, batch_size=64)
    one_by_one = system.score(IMAGES, TEXTS, batch_size=1)  # no padding: every text alone
    for kind in ("generative", "contrastive"):
        np.testing.assert_allclose(together.of(kind), one_by_one.of(kind), atol=1e-5)
    scorer = TorchScorer(system)
    pairs = scorer.score_pairs(scorer.prepare(IMAGES), CAPTIONS, [0, 1, 2])
    np.testing.assert_allclose(pairs["generative"], np.diag(together.generative[:, :3]), atol=1e-5)


def test_the_blank_image_makes_no_text_likelier_and_the_contrastive_score_is_a_cosine(system):
    scorer = TorchScorer(system)
    size = system.encoder.image_processor.size
    blank = scorer.prepare_pixels(torch.zeros(1, 3, size, size))
    scores = scorer.score(blank, TEXTS)
    np.testing.assert_allclose(scores["generative"], 0, atol=1e-6)  # log p(t | blank) - log p(t | blank)
    loss = system.embedding_loss()
    with torch.no_grad():
        pixels = system.encoder.preprocess(IMAGES[:1])
        image = loss.image_embedding(system.visual_tokens(pixels))
        ids, mask, _ = system.tokenize(TEXTS[:2], 64)
        text = loss.text_embedding(system.text_states(ids, mask), mask)
    expected = torch.nn.functional.cosine_similarity(image, text).numpy()
    np.testing.assert_allclose(system.score(IMAGES[:1], TEXTS[:2]).contrastive[0], expected, atol=1e-5)


def test_a_system_without_a_contrastive_loss_has_the_generative_score_only():
    torch.manual_seed(0)
    scores = compose(TINY).score(IMAGES[:1], CAPTIONS)
    assert scores.contrastive is None and scores.generative.shape == (1, 3)
    with pytest.raises(ValueError, match="no contrastive score"):
        scores.of("contrastive")


def test_the_crossattn_system_scores_with_both_kinds_too():
    torch.manual_seed(0)
    system = compose({"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"},
                      "losses": [{"name": "caption-ce"}, {"name": "itc", "dim": 16}]})  # fmt: skip
    fit_batch(system, IMAGES, CAPTIONS, 150)
    scores = system.score(IMAGES, CAPTIONS)
    assert (scores.generative.argmax(1) == np.arange(3)).all(), scores.generative
    assert (scores.contrastive.argmax(1) == np.arange(3)).all(), scores.contrastive
    np.testing.assert_allclose(system.score(IMAGES, CAPTIONS, batch_size=1).contrastive, scores.contrastive, atol=1e-5)


def test_an_empty_text_or_no_input_is_refused_with_its_position(system):
    with pytest.raises(ValueError, match="text 1 is empty"):
        system.score(IMAGES, ["a red square", "  "])
    with pytest.raises(ValueError, match="at least one image"):
        system.score([], ["a red square"])


# --- rows: streamed, every pair, bad input in its own row ------------------------------------------------------


def test_rows_come_image_by_image_with_an_error_row_for_an_unreadable_image_and_an_empty_text(system, image_files,
                                                                                                tmp_path):  # fmt: skip
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    texts = tmp_path / "texts.txt"
    texts.write_text("a red square\n\na white square\r\n")
    rows = list(score_paths(TorchScorer(system), [image_files[0], str(broken), image_files[2]], Texts(path=texts),
                            batch_size=2, text_batch=1))  # fmt: skip
    assert [(r.image, r.text_index, r.error is None) for r in rows] == [
        (None, 1, False), (image_files[0], 0, True), (image_files[0], 2, True), (str(broken), None, False),
        (image_files[2], 0, True), (image_files[2], 2, True)]  # fmt: skip
    assert rows[0].error == EMPTY_TEXT and "PIL" in rows[3].error
    expected = system.score([IMAGES[0], IMAGES[2]], ["a red square", "a white square"])
    got = np.array([[r.scores["generative"] for r in rows if r.image == p] for p in (image_files[0], image_files[2])])
    np.testing.assert_allclose(got, expected.generative, atol=1e-5)
    assert rows[-1].text == "a white square"  # \r\n ends a line, it is not part of the text


def test_ten_thousand_texts_against_one_image_stream_in_bounded_memory(system, image_files, tmp_path):
    scorer = TorchScorer(system)

    def peak(n: int) -> tuple[int, int]:
        path = tmp_path / f"texts-{n}.txt"
        path.write_text("".join(f"a red square number {i}\n" for i in range(n)))
        sink = open(tmp_path / f"rows-{n}.jsonl", "w")
        tracemalloc.start()
        writer = ScoreWriter(sink, "jsonl", scorer.kinds, Texts(path=path))
        rows = 0
        for row in score_paths(scorer, image_files[:1], Texts(path=path), text_batch=256):
            writer.write(row)
            rows += row.error is None
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sink.close()
        return rows, top

    small_rows, small = peak(1_000)
    rows, large = peak(10_000)
    assert (small_rows, rows) == (1_000, 10_000)
    # Ten times the texts: the texts file is 10x larger, but only one chunk of texts and one float per text and
    # kind (80 KB for 10,000) are held, never the texts or their rows.
    assert large < small + 1_000_000, (small, large)
    assert sum(1 for _ in open(tmp_path / "rows-10000.jsonl")) == 10_000


def test_matrix_writes_a_row_per_image_and_a_column_per_text(system, image_files, tmp_path):
    stream = io.StringIO()
    texts = Texts(["a red square", "", "a white square"])
    writer = ScoreWriter(stream, "matrix", ["contrastive"], texts)
    for row in score_paths(TorchScorer(system), image_files[:2], texts, kinds=["contrastive"]):
        writer.write(row)
    writer.close()
    table = list(csv.reader(io.StringIO(stream.getvalue())))
    assert table[0] == ["image", "a red square", "", "a white square", "error"]
    assert [r[0] for r in table[1:]] == image_files[:2] and all(r[2] == "" and r[4] == "" for r in table[1:])
    expected = system.score(IMAGES[:2], ["a red square", "a white square"]).contrastive
    np.testing.assert_allclose([[float(r[1]), float(r[3])] for r in table[1:]], expected, atol=1e-5)


# --- the command -----------------------------------------------------------------------------------------------


def test_score_command_writes_jsonl_csv_and_reads_texts_from_stdin(saved, system, image_files, tmp_path):
    done = run_cli("score", str(saved), *image_files, "--text", "a red square", "--text", "a white square")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [set(r) for r in rows[:1]] == [{"image", "text_index", "text", "generative", "contrastive", "error"}]
    expected = system.score(IMAGES, ["a red square", "a white square"])
    np.testing.assert_allclose(np.array([r["contrastive"] for r in rows]).reshape(3, 2), expected.contrastive,
                               atol=1e-5)  # fmt: skip
    assert "scored 6 pairs" in done.stderr

    out = tmp_path / "rows.csv"
    piped = run_cli("score", str(saved), image_files[0], "--texts", "-", "--kind", "generative", "--format", "csv",
                    "--out", str(out), input="a red square\n\n")  # fmt: skip
    assert piped.returncode == 1, piped.stderr  # the empty text is an error row
    table = list(csv.DictReader(out.open()))
    assert list(table[0]) == ["image", "text_index", "text", "generative", "error"]
    assert [r["error"] for r in table] == [EMPTY_TEXT, ""]
    assert float(table[1]["generative"]) == pytest.approx(float(expected.generative[0, 0]), abs=1e-5)


def test_score_command_refuses_what_it_cannot_do_clearly(saved, image_files, tmp_path):
    both = run_cli("score", str(saved), image_files[0], "--format", "matrix", "--text", "a red square")
    assert both.returncode == 2 and "--kind" in both.stderr
    none = run_cli("score", str(saved), image_files[0])
    assert none.returncode == 2 and "--text" in none.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    nothing = run_cli("score", str(saved), image_files[0], "--texts", str(empty))
    assert nothing.returncode == 2 and "no texts" in nothing.stderr
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    undecodable = run_cli("score", str(saved), image_files[0], "--texts", str(latin))
    assert undecodable.returncode == 2 and "line 1 is not UTF-8" in undecodable.stderr


def test_score_command_says_which_score_a_system_lacks(tmp_path, image_files):
    torch.manual_seed(0)
    saved = compose(TINY).save(tmp_path / "plain")
    done = run_cli("score", str(saved), image_files[0], "--kind", "contrastive", "--text", "a red square")
    assert done.returncode == 2 and "no contrastive score" in done.stderr and "itc" in done.stderr
    generative = run_cli("score", str(saved), image_files[0], "--text", "a red square")
    assert generative.returncode == 0 and set(json.loads(generative.stdout)) == {"image", "text_index", "text",
                                                                                 "generative", "error"}  # fmt: skip


def test_a_texts_file_that_is_one_huge_line_is_read_up_to_the_cap(tmp_path):
    """A hostile texts file of one 5 MB line and no newline, then a file whose first line is over the cap: each line is
    read to MAX_LINE_CHARS and the rest skipped, so neither memory nor the rows grow with it; the lines after it
    are read as they are."""
    from prefixcap.score_rows import MAX_LINE_CHARS

    huge = tmp_path / "huge.txt"
    huge.write_text("red " * 1_250_000)
    tracemalloc.start()
    texts = [text for chunk in Texts(path=huge).chunks(8) for _, text in chunk]
    top = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [len(t) for t in texts] == [MAX_LINE_CHARS] and texts[0].startswith("red red")
    assert top < 1_000_000, top  # the 5 MB line never sat in memory
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("blue " * 2000 + "\na red circle\r\n\nlast")
    assert [t[:12] for _, t in next(Texts(path=mixed).chunks(10))] == ["blue blue bl", "a red circle", "", "last"]
    assert Texts(path=mixed).count() == 4

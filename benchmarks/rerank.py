"""Does the system's own score make its captions better and its doubts useful? On held-out shapes images:

    python benchmarks/rerank.py RUN_OR_SAVED_SYSTEM [--images 200] [--k 5] [--out PATH]

- reranking: exact-scene accuracy (the shapes world's parser) and CLIP-S (the shipped shapes-CLIP) of the greedy
  caption against the best of K candidates (greedy + K-1 sampled; prefixcap.judge) by each ranking: auto
  (likelihood + contrastive, the default), the likelihood alone, and each score type alone. Meant for an
  early checkpoint, where greedy still gets scenes wrong (below 90%): a finished quickstart states nearly all.
- abstention: with the system's calibrated --min-score (prefixcap.score.calibrate, saved by `prefixcap run`; measured
  here on the validation split when the system carries none), which greedy captions are flagged unsure: the share
  flagged, the share of flagged captions that are really wrong (precision), the share of wrong captions flagged
  (recall), and the accuracy of the captions left unflagged.

Figures only, no target: it exits 0 whenever it wrote its results (issue 23 sets none for these).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import prefixcap  # noqa: E402
from prefixcap.bench_report import git_revision, machine  # noqa: E402
from prefixcap.data import ShapesOptions  # noqa: E402
from prefixcap.data.shapes import ShapesSource, parse_caption  # noqa: E402
from prefixcap.judge import RANK_BY, Judge  # noqa: E402
from prefixcap.metrics.clipscore import ClipScorer  # noqa: E402
from prefixcap.persist import saved_system_dir  # noqa: E402
from prefixcap.score import TorchScorer, calibrate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BATCH = 16


def measure(source: str, images: int, k: int, seed: int) -> dict[str, Any]:
    system = prefixcap.load(saved_system_dir(source))
    data = ShapesSource(ShapesOptions())
    examples = [data.example("test", i) for i in range(images)]
    scorer = TorchScorer(system)
    calibration = system.score_calibration or calibrate(scorer, _val_batches(system, data, 256))
    clip = ClipScorer.from_pretrained(data.clip_model)
    judge = Judge(scorer, rerank=k)
    torch.manual_seed(seed)
    ways = {rank_by: Judge(scorer, rank_by=rank_by, rerank=k) for rank_by in RANK_BY if rank_by in
            ("auto", "likelihood", *scorer.kinds)}  # fmt: skip
    greedy, picked, scored = [], {way: [] for way in ways}, {kind: [] for kind in scorer.kinds}
    tic = time.perf_counter()
    for start in range(0, images, BATCH):
        group = [e.image for e in examples[start : start + BATCH]]
        candidates = judge.candidates(system, group, {})
        for texts, scores in zip(candidates, judge.score(group, candidates)):
            greedy.append(texts[0])
            for way, ranker in ways.items():
                picked[way].append(texts[int(np.argmax(ranker.rank(scores)))])
            for kind in scorer.kinds:
                scored[kind].append(float(scores[kind][0]))  # the greedy caption's own score
    seconds = time.perf_counter() - tic
    truth = [e.scene for e in examples]
    pictures = [e.image for e in examples]

    def quality(captions: list[str]) -> dict[str, float]:
        right = [parse_caption(c) == scene for c, scene in zip(captions, truth)]
        return {"exact_scene_accuracy": float(np.mean(right)),
                "clip_s": float(np.mean(clip.score(pictures, captions).per_image_clip_s))}  # fmt: skip

    rerank = {"greedy": quality(greedy)}
    rerank.update({f"rerank_{k}_by_{way}": quality(captions) for way, captions in picked.items()})
    wrong = np.array([parse_caption(c) != scene for c, scene in zip(greedy, truth)])
    abstention = {}
    for kind in scorer.kinds:
        threshold = calibration[kind]["min_score"]
        flagged = np.array(scored[kind]) < threshold
        abstention[kind] = {
            "min_score": threshold,
            "flagged_share": float(flagged.mean()),
            "flagged_really_wrong": float(wrong[flagged].mean()) if flagged.any() else None,
            "wrong_flagged": float(flagged[wrong].mean()) if wrong.any() else None,
            "unflagged_share": float((~flagged).mean()),
            "unflagged_accuracy": float(1 - wrong[~flagged].mean()) if (~flagged).any() else None,
        }
    return {"source": str(source), "images": images, "k": k, "seed": seed, "seconds": round(seconds, 1),
            "greedy_wrong": int(wrong.sum()), "calibration": calibration, "rerank": rerank,
            "abstention": abstention}  # fmt: skip


def _val_batches(system: Any, data: ShapesSource, n: int):
    for start in range(0, n, BATCH):
        found = [data.example("val", i) for i in range(start, min(n, start + BATCH))]
        yield system.encoder.preprocess([e.image for e in found]), [e.captions[0] for e in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run directory or a saved system, trained on shapes")
    parser.add_argument("--images", type=int, default=200, help="held-out shapes images (default 200)")
    parser.add_argument("--k", type=int, default=5, help="candidates per image (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rerank_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "revision": git_revision(), **measure(args.source, args.images, args.k, args.seed)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("rerank", "abstention")}, indent=2))


if __name__ == "__main__":
    main()

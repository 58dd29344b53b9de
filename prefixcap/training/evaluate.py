"""Evaluation: captions for a split, streamed a batch of images at a time, and the metrics the run reports."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from prefixcap.data.loader import CaptionSet, EvalItems, Items, Preprocess, default_workers, loader
from prefixcap.errors import PrefixcapError
from prefixcap.interfaces import Batch, DatasetSource, System
from prefixcap.metrics.clipscore import ClipScorer, choose_clip_model
from prefixcap.recipe import Recipe
from prefixcap.training.errors import RunError


def load_scorer(recipe: Recipe, source: DatasetSource) -> ClipScorer | None:
    """The recipe's CLIPScore model, loaded before training so that a missing one costs seconds, not a run."""
    name = choose_clip_model(recipe.eval.clip_model, source.clip_model)
    if name is None:
        return None
    try:
        return ClipScorer.from_pretrained(name)
    except PrefixcapError as e:
        raise RunError(f"{e} (eval.clip_model picks the CLIPScore model; set it to null to skip CLIPScore)") from e


def workers(recipe: Recipe, decoding: bool) -> int:
    n = recipe.train.num_workers
    return default_workers(decoding) if n == "auto" else n


def items_batch(system: System, items: Items, max_tokens: int, features: bool = False) -> Batch:
    """The Batch of a worker's items: their pixels, or their cached features when ``features``."""
    input_ids, mask, labels = system.tokenize(items.captions, max_tokens)
    return Batch(pixel_values=None if features else items.x, input_ids=input_ids, attention_mask=mask, labels=labels,
                 features=items.x if features else None, captions=items.captions,
                 references=items.references)  # fmt: skip


def to_device(batch: Batch, device: torch.device) -> Batch:
    for name, value in vars(batch).items():
        if isinstance(value, Tensor):
            setattr(batch, name, value.to(device, non_blocking=value.is_pinned()))
    return batch


@torch.no_grad()
def evaluate(system: System, source: DatasetSource, split: CaptionSet, recipe: Recipe,
             scorer: ClipScorer | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:  # fmt: skip
    """Captions, loss and metrics for a split, streamed: workers decode a batch of images at a time, and only the
    captions and per-image scores are kept (CIDEr and the data's own metrics need every caption; no image is kept)."""
    from PIL import Image

    from prefixcap.metrics.captioning import caption_metrics

    system.eval()
    device = next(system.parameters()).device
    items_in = loader(EvalItems(split, Preprocess(system.encoder), rgb=scorer is not None),
                      workers=workers(recipe, decoding=True), batch_size=recipe.eval.batch_size)  # fmt: skip
    captions: list[str] = []
    references: list[list[str]] = []
    rows: list[int] = []
    clip, ref_clip = [], []
    loss_sum = 0.0
    for items in items_in:
        split.broken.update(items.broken)
        if not len(items):
            continue
        batch = items_batch(system, items, recipe.train.max_caption_tokens)
        generated = system.generate(batch.pixel_values.to(device), recipe.generate)
        loss_sum += float(system.loss(to_device(batch, device))[0]) * len(items)
        if scorer is not None:
            embedded = scorer.image_embeddings([Image.fromarray(rgb) for rgb in items.rgb])
            scores = scorer.score_embedded(embedded, generated, items.references)
            clip += scores.per_image_clip_s
            ref_clip += scores.per_image_ref_clip_s
        captions += generated
        references += items.references
        rows += items.rows
    metrics = {"loss": loss_sum / max(1, len(captions))}
    metrics.update(caption_metrics(captions, references))
    metrics.update(source.task_metrics(split.name, rows, captions))
    samples = [{"index": i, "caption": c, "references": r} for i, c, r in zip(rows, captions, references)]
    if clip:
        metrics.update(clip_s=sum(clip) / len(clip), ref_clip_s=sum(ref_clip) / len(ref_clip))
        for sample, s, ref in zip(samples, clip, ref_clip):
            sample.update(clip_s=round(s, 5), ref_clip_s=round(ref, 5))
    return metrics, samples


def score_calibration(system: System, split: CaptionSet, recipe: Recipe) -> dict[str, dict[str, float]]:
    """Each score type's default ``--min-score`` (prefixcap.score.calibrate) on the held-out ``split``: what the
    system's own references reach, so that a caption the system doubts more than 95% of true captions is unsure."""
    from prefixcap.score import TorchScorer, calibrate

    scorer = TorchScorer(system)
    items_in = loader(EvalItems(split, Preprocess(system.encoder), rgb=False),
                      workers=workers(recipe, decoding=True), batch_size=recipe.eval.batch_size)  # fmt: skip
    batches = ((items.x, [refs[0] for refs in items.references]) for items in items_in if len(items))
    training = system.training
    try:
        return calibrate(scorer, batches)
    finally:
        system.train(training)

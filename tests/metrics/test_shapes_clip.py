"""The CLIPScore model that ships for the shapes world (prefixcap/shapes-clip), checked on images it never saw."""

from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource
from prefixcap.metrics.clipscore import PROMPT, ClipScorer, clip_s


def test_true_caption_outscores_another_images_caption_on_held_out_images():
    # Seed 0 is the recipes' world; the scorer was trained on the pretrain stream, whose pictures no split draws (scripts/pretrain_shapes.py).
    examples = list(ShapesSource(ShapesOptions(test_size=300)).examples("test"))
    scorer = ClipScorer.from_pretrained("prefixcap/shapes-clip")
    images = scorer.image_embeddings([e.image for e in examples])
    captions = scorer.text_embeddings([PROMPT + e.captions[0] for e in examples])
    n = len(examples)
    pairs = [(i, (i + 1) % n) for i in range(n) if examples[i].scene != examples[(i + 1) % n].scene]
    own = clip_s(images, captions)
    other = clip_s(images[[i for i, _ in pairs]], captions[[j for _, j in pairs]])
    wins = sum(bool(own[i] > o) for (i, _), o in zip(pairs, other))
    print(f"true caption wins {wins}/{len(pairs)} held-out pairs")
    assert len(pairs) > 250 and wins / len(pairs) >= 0.95

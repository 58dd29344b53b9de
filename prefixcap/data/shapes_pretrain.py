"""Pretrain the two image-text models that ship with prefixcap, on the shapes world, with this script.

No CLIP or SigLIP weights can be fetched offline, yet the quickstart needs a pretrained frozen encoder (a random one
cannot tell a circle from a square well enough for a decoder to learn it in minutes) and shapes runs need a real
CLIPScore. So both are trained here, once, contrastively on shapes images and their captions:

- ``shapes-siglip``: transformers SiglipModel, sigmoid loss. Its vision tower is the quickstart's frozen encoder
  (``checkpoint: prefixcap/shapes-siglip``), the same class as google/siglip-base-patch16-224, scaled down.
- ``shapes-clip``: transformers CLIPModel, softmax contrastive loss. The CLIPScore scorer of shapes runs. It is a
  separate model on purpose: scoring captions with the captioner's own encoder would reward its blind spots.

Hard negatives make both learn what a caption is about: besides the other images' captions, each batch holds one
caption of a near-miss scene per image (two shapes swapped, one colour or kind changed, a shape added or dropped),
so "red circle left of blue square" must beat "blue square left of red circle". Both train on a shapes seed that no
recipe uses (images differ from every run's splits) and are validated on held-out images of seed 0, the recipes'.

    python -m prefixcap.data.shapes_pretrain            # rewrites prefixcap/assets/shapes-{siglip,clip}/
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import COLOURS, KINDS, SIZES, Scene, Shape, ShapesExample, ShapesSource, references
from prefixcap.decoders.tokenizer import BOS_ID, EOS_ID, PAD_ID, tiny_tokenizer, tiny_vocab_size
from prefixcap.images import ImageProcessor
from prefixcap.metrics.clipscore import PROMPT

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PRETRAIN_SEED = 7919  # a shapes seed of its own: no recipe draws these images
IMAGE_SIZE, PATCH = 64, 8  # the shapes world's default size, 8x8 patches -> 64 tokens
MAX_TEXT = 32  # tokens, with <s>, </s> and the CLIPScore prompt: the longest shapes caption has 22 words
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH)  # fmt: skip
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=MAX_TEXT, vocab_size=tiny_vocab_size(), pad_token_id=PAD_ID,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID)  # fmt: skip


def near_miss(scene: Scene, rng: random.Random, sizes: bool) -> Scene:
    """A scene that differs from ``scene`` in one thing a caption states."""
    shapes = list(scene)
    while True:
        i = rng.randrange(len(shapes))
        move = rng.choice(["swap", "colour", "kind", "count"] + (["size"] if sizes else []))
        new = list(shapes)
        if move == "swap" and len(new) > 1:
            j = rng.choice([k for k in range(len(new)) if k != i])
            new[i], new[j] = new[j], new[i]
        elif move == "colour":
            new[i] = new[i]._replace(colour=rng.choice([c for c in COLOURS if c != new[i].colour]))
        elif move == "kind":
            new[i] = new[i]._replace(kind=rng.choice([k for k in KINDS if k != new[i].kind]))
        elif move == "size":
            new[i] = new[i]._replace(size=rng.choice([s for s in SIZES if s != new[i].size]))
        elif move == "count" and len(new) > 1 and rng.random() < 0.5:
            del new[i]
        elif move == "count" and len(new) < 3:
            extra = Shape(rng.choice(list(COLOURS)), rng.choice(KINDS), rng.choice(SIZES) if sizes else None)
            new.insert(rng.randrange(len(new) + 1), extra)
        if tuple(new) != tuple(shapes):
            return tuple(new)


def world(split: str, size: int, seed: int, sizes: bool) -> ShapesSource:
    return ShapesSource(ShapesOptions(seed=seed, sizes=sizes, **{f"{split}_size": size}))


def load_images(n: int, split: str, seed: int, processor: ImageProcessor) -> tuple[Tensor, list[Scene], list[bool], Tensor]:
    """Half the images without sizes (the default world), half with; pixels as the model's processor makes them,
    and what each patch shows (``patch_labels``)."""
    pixels, scenes, sized, patches = [], [], [], []
    for sizes in (False, True):
        for ex in world(split, n // 2, seed, sizes).examples(split):
            pixels.append(processor.one(ex.image))
            scenes.append(ex.scene)
            sized.append(sizes)
            patches.append(patch_labels(ex))
    return torch.stack(pixels), scenes, sized, torch.stack(patches)


def patch_labels(example: ShapesExample) -> Tensor:
    """(patches, 3): the kind, colour and size of the shape covering most of each 8x8 patch; 0s for background.

    Shapes are drawn without antialiasing in their exact fill colour and in disjoint boxes, so a pixel belongs to
    shape i when it lies in box i and has shape i's colour."""
    a = np.asarray(example.image)
    owner = np.zeros(a.shape[:2], dtype=np.int64)  # 0: background, i + 1: shape i
    for i, (shape, (x0, y0, x1, y1)) in enumerate(zip(example.scene, example.boxes)):
        box = owner[y0 : y1 + 1, x0 : x1 + 1]
        box[(a[y0 : y1 + 1, x0 : x1 + 1] == COLOURS[shape.colour]).all(-1)] = i + 1
    grid = a.shape[0] // PATCH
    cells = owner.reshape(grid, PATCH, grid, PATCH).transpose(0, 2, 1, 3).reshape(grid * grid, PATCH * PATCH)
    counts = np.stack([(cells == k).sum(1) for k in range(1, len(example.scene) + 1)], 1)
    top = counts.argmax(1)
    rows = [[0, 0, 0] if counts[p, top[p]] < PATCH * PATCH // 8 else slot_labels(example.scene)[3 * top[p] : 3 * top[p] + 3]
            for p in range(grid * grid)]  # fmt: skip
    return torch.tensor(rows)


def tokenize(texts: list[str], kind: str) -> dict[str, Tensor]:
    # The scorer only ever sees captions after CLIPScore's prompt, so that is how it learns them.
    texts = [PROMPT + t for t in texts] if kind == "clip" else texts
    # SigLIP's text tower pools the last position, so it is trained (and must be used) padded to MAX_TEXT.
    tok = tiny_tokenizer()
    return tok(texts, padding="max_length", max_length=MAX_TEXT, truncation=True, return_tensors="pt")


# Each of the three left-to-right places: what kind (or none), what colour (or none), what size (none, unsized,
# small, large). A linear probe of the pooled embedding predicts them during training (see ``scene_loss``).
SLOT_CLASSES = (1 + len(KINDS), 1 + len(COLOURS), 2 + len(SIZES))


def slot_labels(scene: Scene) -> list[int]:
    labels = []
    for i in range(3):
        shape = scene[i] if i < len(scene) else None
        labels += [0, 0, 0] if shape is None else [
            1 + KINDS.index(shape.kind), 1 + list(COLOURS).index(shape.colour),
            1 if shape.size is None else 2 + SIZES.index(shape.size),
        ]  # fmt: skip
    return labels


def patch_loss(probe: torch.nn.Linear, tokens: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of a per-token linear read-out of what each patch shows.

    The decoder reads the patch tokens, not the pooled embedding, so the encoder's tokens must each say what is
    there; the pooled terms alone left the kind of a shape poorly readable from them (a linear probe of the patch
    tokens told circle, square and triangle apart 77% of the time)."""
    logits = probe(tokens).split(list(SLOT_CLASSES), dim=-1)  # each (B, N, classes)
    return torch.stack([F.cross_entropy(lg.flatten(0, 1), labels[..., j].flatten()) for j, lg in enumerate(logits)]).mean()


def scene_loss(probe: torch.nn.Linear, image_emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the probe's slot predictions, and which of them were right (B, 9).

    Contrastive loss alone left the shape's kind poorly encoded: a linear probe of the patch tokens told circle,
    square and triangle apart only 77% of the time, since in-batch negatives rarely differ in kind alone. This
    supervised term (as in ViT's supervised pre-training) makes every attribute a caption states explicit."""
    logits = probe(image_emb).split([n for _ in range(3) for n in SLOT_CLASSES], dim=-1)
    losses = [F.cross_entropy(lg, labels[:, j]) for j, lg in enumerate(logits)]
    right = torch.stack([lg.argmax(-1) == labels[:, j] for j, lg in enumerate(logits)], dim=1)
    return torch.stack(losses).mean(), right


def contrastive_loss(model, kind: str, img: Tensor, texts: dict[str, Tensor]) -> Tensor:
    """Image embeddings (B) against texts (B positives first, then B near misses)."""
    b = img.shape[0]
    img = F.normalize(img, dim=-1)
    txt = F.normalize(_features(model.get_text_features(**texts)), dim=-1)
    logits = img @ txt.T * model.logit_scale.exp()  # (B, 2B)
    if kind == "siglip":
        logits = logits + model.logit_bias
        labels = -torch.ones_like(logits)
        labels[:, :b] += 2 * torch.eye(b)
        return -F.logsigmoid(labels * logits).sum() / b
    target = torch.arange(b)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2


def _features(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output  # transformers 5 may return a model output


def build(kind: str):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    if kind == "siglip":
        model = SiglipModel(SiglipConfig(vision_config={**VISION, "vision_use_head": True}, text_config=TEXT))
        # The SigLIP paper's start, t = 10 and b = -10, keeps the many negatives from swamping the first steps;
        # transformers initialises t = 1, b = 0.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        return model
    return CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=128))


def processor_for(kind: str) -> ImageProcessor:
    if kind == "siglip":  # as prefixcap.encoders.siglip preprocesses
        return ImageProcessor(IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="squash")
    return ImageProcessor(IMAGE_SIZE, CLIP_MEAN, CLIP_STD, resize="crop")  # as CLIPImageProcessor does


@torch.no_grad()
def pair_accuracy(model, kind: str, probe: torch.nn.Linear | None = None, dense: torch.nn.Linear | None = None,
                  n: int = 400) -> dict[str, float]:  # fmt: skip
    """Held-out check: image i's caption against image j's, for pairs of different scenes; and against a near miss
    (and, with the training probe, how often it reads each slot attribute right)."""
    model.eval()
    pixels, scenes, sized, patches = load_images(n, "test", 0, processor_for(kind))
    rng = random.Random(0)
    own = [references(s)[0] for s in scenes]
    miss = [rng.choice(references(near_miss(s, rng, z))) for s, z in zip(scenes, sized)]
    img = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    emb = lambda texts: F.normalize(_features(model.get_text_features(**tokenize(texts, kind))), dim=-1)  # noqa: E731
    own_e, miss_e = emb(own), emb(miss)
    sim_own, sim_miss = (img * own_e).sum(-1), (img * miss_e).sum(-1)
    other = [(i, (i + 1) % len(scenes)) for i in range(len(scenes)) if scenes[i] != scenes[(i + 1) % len(scenes)]]
    wins = sum(float(sim_own[i] > img[i] @ own_e[j]) for i, j in other)
    report = {"other_image_pairs": len(other), "beats_other_image_caption": wins / len(other),
              "beats_near_miss": float((sim_own > sim_miss).float().mean())}  # fmt: skip
    if probe is not None:
        raw = _features(model.get_image_features(pixel_values=pixels))
        _, right = scene_loss(probe, raw, torch.tensor([slot_labels(s) for s in scenes]))
        for j, name in enumerate(("kind", "colour", "size")):
            report[f"probe_{name}_accuracy"] = float(right[:, j::3].float().mean())
    if dense is not None:  # what the decoder will read: each shape patch's kind, from its token alone
        kinds = dense(model.vision_model(pixel_values=pixels).last_hidden_state)[..., : SLOT_CLASSES[0]].argmax(-1)
        shown = patches[..., 0] > 0
        report["patch_kind_accuracy"] = float((kinds[shown] == patches[..., 0][shown]).float().mean())
    return report


def train(kind: str, images: int, epochs: int, batch: int, lr: float, seed: int = 0) -> tuple[object, dict]:
    torch.manual_seed(seed)
    model = build(kind)
    width = model.config.vision_config.hidden_size if kind == "siglip" else model.config.projection_dim
    probe = torch.nn.Linear(width, 3 * sum(SLOT_CLASSES))  # the probes are dropped after training
    dense = torch.nn.Linear(VISION["hidden_size"], sum(SLOT_CLASSES)) if kind == "siglip" else None
    processor = processor_for(kind)
    started = time.perf_counter()
    pixels, scenes, sized, patches = load_images(images, "train", PRETRAIN_SEED, processor)
    print(f"{kind}: {len(scenes)} images in {time.perf_counter() - started:.0f} s", flush=True)
    steps = epochs * (len(scenes) // batch)
    labels = torch.tensor([slot_labels(s) for s in scenes])
    params = [*model.parameters(), *probe.parameters(), *(dense.parameters() if dense else [])]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    rng = random.Random(seed)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start : start + batch]
            captions = [rng.choice(references(scenes[i])) for i in idx]
            misses = [rng.choice(references(near_miss(scenes[i], rng, sized[i]))) for i in idx]
            model.train()
            if dense is None:
                img = _features(model.get_image_features(pixel_values=pixels[idx]))
            else:  # SigLIP's image embedding is its vision tower's pooled output; the patch tokens come with it
                vision = model.vision_model(pixel_values=pixels[idx])
                img = vision.pooler_output
            contrastive = contrastive_loss(model, kind, img, tokenize(captions + misses, kind))
            supervised, _ = scene_loss(probe, img, labels[idx])
            loss = contrastive + supervised
            if dense is not None:
                loss = loss + patch_loss(dense, vision.last_hidden_state, patches[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"{kind}: step {step}/{steps} contrastive {contrastive.item():.4f} scene {supervised.item():.4f} "
                      f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    report = {"kind": kind, "train_images": len(scenes), "epochs": epochs, "batch": batch, "lr": lr,
              "steps": steps, "train_seconds": round(time.perf_counter() - started), "final_loss": loss.item(),
              **pair_accuracy(model, kind, probe, dense)}  # fmt: skip
    return model, report


def save(model, kind: str, report: dict, out: Path) -> None:
    from transformers import CLIPImageProcessor

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    tok = tiny_tokenizer()
    tok.model_max_length = MAX_TEXT
    tok.save_pretrained(out)
    if kind == "clip":  # so AutoImageProcessor reproduces the preprocessing it was trained with
        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out)  # fmt: skip
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["siglip", "clip", "both"], default="both")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    for kind in ("siglip", "clip") if args.kind == "both" else (args.kind,):
        model, report = train(kind, args.images, args.epochs, args.batch, args.lr)
        print(json.dumps(report), flush=True)
        save(model, kind, report, args.out / f"shapes-{kind}")


if __name__ == "__main__":
    main()

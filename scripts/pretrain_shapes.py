"""Pretrain the two models that ship with prefixcap, on the shapes world, with this script.

No CLIP or SigLIP weights can be fetched offline, yet the quickstart needs a pretrained frozen encoder (a random one
cannot tell a circle from a square well enough for a decoder to learn it in minutes) and shapes runs need a real
CLIPScore. So both are trained here, once, on the shapes world's ``pretrain`` stream and checked on its
``pretrain-heldout`` stream: each stream owns layouts no other stream draws (prefixcap/data/shapes.py), so no image
of any run's train, val or test split, under any seed, is one of these, and the recipes' test split informs no choice
made here (such as the number of steps below):

- ``shapes-clip``: a transformers CLIPModel, the CLIPScore model of shapes runs. Softmax contrastive loss with hard
  negatives: besides the other images' captions, each batch holds a caption of a near-miss scene per image (two
  shapes swapped, a colour or kind changed, a shape added or dropped), so "red circle left of blue square" must beat
  "blue square left of red circle"; a linear read-out of the scene from the image embedding is trained alongside.
- ``shapes-siglip``: a SiglipVisionModel, the quickstart's frozen encoder (``checkpoint: prefixcap/shapes-siglip``),
  the class of google/siglip-base-patch16-224 scaled down. It is pretrained by captioning (as CapPa, Tschannen et
  al. 2023), through prefixcap's own prefix system with every weight trained: the patch tokens are what a decoder
  reads, and captioning is the objective that makes them say what a caption needs. The first attempt, SigLIP's
  sigmoid loss plus supervised read-outs of the pooled embedding and of each patch, left the kind of a shape poorly
  readable from the tokens (a linear probe told circle, square and triangle apart on 49% of shape patches) and a
  quickstart decoder reached 46% exact-scene accuracy on it. Length is what matters for a ViT this small learning
  shapes from scratch: captioning for 1,000 steps on 16,000 images left the captioner itself at 39% and the
  quickstart at 46.5%; 4,000 steps on 32,000 images (about an hour on one CPU core) gives 88% and 100% (figures of
  the first shipped encoder; training.json beside each model records its own). The decoder
  trained here is thrown away; a separate model scores the captioners (the CLIP above): scoring with the
  captioner's own encoder would reward its blind spots.

    python scripts/pretrain_shapes.py            # rewrites prefixcap/assets/shapes-{siglip,clip}/
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import COLOURS, KINDS, SIZES, Scene, Shape, ShapesSource, references, scene_accuracy
from prefixcap.decoders.tokenizer import BOS_ID, EOS_ID, PAD_ID, tiny_tokenizer, tiny_vocab_size
from prefixcap.images import ImageProcessor
from prefixcap.metrics.clipscore import PROMPT, embeddings_of

ASSETS = Path(__file__).resolve().parent.parent / "prefixcap" / "assets"
TRAIN, HELDOUT = "pretrain", "pretrain-heldout"  # the shapes world's streams that no recipe can name
IMAGE_SIZE, PATCH = 64, 8  # the shapes world's default size, 8x8 patches -> 64 tokens
MAX_TEXT = 32  # tokens, with <s>, </s> and the CLIPScore prompt: the longest shapes caption has 22 words
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH)  # fmt: skip
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=MAX_TEXT, vocab_size=tiny_vocab_size(), pad_token_id=PAD_ID,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID)  # fmt: skip
# The captioner the encoder is pretrained in: as the quickstart's, so its tokens suit that kind of reader.
CAPTIONER = {
    "connector": {"name": "mlp", "pool": "pixel-shuffle", "factor": 2, "hidden": 512, "dropout": 0.0},
    "decoder": {"name": "smollm", "checkpoint": "tiny", "finetune": "full",
                "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}},
}  # fmt: skip


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


def load_images(n: int, stream: str, processor: ImageProcessor) -> tuple[Tensor, list[Scene], list[bool]]:
    """Half the images without sizes (the default world), half with; pixels as the model's processor makes them.
    (Held in RAM: 32,000 images of 64 pixels are 1.5 GB, and this script is no model of a data path.)"""
    pixels, scenes, sized = [], [], []
    for sizes in (False, True):
        world = ShapesSource(ShapesOptions(sizes=sizes))
        for ex in (world.draw(stream, i) for i in range(n // 2)):
            pixels.append(processor.one(ex.image))
            scenes.append(ex.scene)
            sized.append(sizes)
    return torch.stack(pixels), scenes, sized


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )


def optimizer_step(loss: Tensor, clipped: Iterable[Tensor], optimizer: torch.optim.Optimizer, schedule) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clipped, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()


def batches(n: int, batch: int, epochs: int, seed: int):
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


# --- shapes-clip: contrastive, with near misses and a scene read-out ------------------------------------------

# Each of the three left-to-right places: what kind (or none), what colour (or none), what size (none, unsized,
# small, large). A linear read-out of the image embedding predicts them during training (see ``scene_loss``).
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


def scene_loss(probe: torch.nn.Linear, image_emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the read-out's slot predictions, and which of them were right (B, 9).

    In-batch negatives rarely differ in one shape's kind alone, so the contrastive loss alone learns kind slowly;
    this supervised term (as in ViT's supervised pre-training) makes every attribute a caption states explicit."""
    logits = probe(image_emb).split([n for _ in range(3) for n in SLOT_CLASSES], dim=-1)
    losses = [F.cross_entropy(lg, labels[:, j]) for j, lg in enumerate(logits)]
    right = torch.stack([lg.argmax(-1) == labels[:, j] for j, lg in enumerate(logits)], dim=1)
    return torch.stack(losses).mean(), right


@lru_cache(maxsize=1)
def _text_tokenizer():
    return tiny_tokenizer()  # read once: tokenize runs every training step


def tokenize(texts: list[str]) -> dict[str, Tensor]:
    # The scorer only ever sees captions after CLIPScore's prompt, so that is how it learns them; padded to
    # MAX_TEXT as ClipScorer pads (which for CLIP's EOS pooling under a causal mask changes nothing).
    return _text_tokenizer()([PROMPT + t for t in texts], padding="max_length", max_length=MAX_TEXT, truncation=True,
               return_tensors="pt")  # fmt: skip


def contrastive_loss(model, img: Tensor, texts: dict[str, Tensor]) -> Tensor:
    """Image embeddings (B) against texts (B positives first, then B near misses)."""
    b = img.shape[0]
    img = F.normalize(img, dim=-1)
    txt = F.normalize(embeddings_of(model.get_text_features(**texts)), dim=-1)
    logits = img @ txt.T * model.logit_scale.exp()  # (B, 2B)
    target = torch.arange(b)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2


@torch.no_grad()
def clip_report(model, probe: torch.nn.Linear, n: int = 400) -> dict[str, float]:
    """Held-out check: image i's caption against image j's, for pairs of different scenes; against a near miss;
    and how often the read-out gets each slot attribute right."""
    model.eval()
    pixels, scenes, sized = load_images(n, HELDOUT, clip_processor())
    rng = random.Random(0)
    own = [references(s)[0] for s in scenes]
    miss = [rng.choice(references(near_miss(s, rng, z))) for s, z in zip(scenes, sized)]
    raw = embeddings_of(model.get_image_features(pixel_values=pixels))
    img = F.normalize(raw, dim=-1)
    own_e, miss_e = (F.normalize(embeddings_of(model.get_text_features(**tokenize(t))), dim=-1) for t in (own, miss))
    sim_own, sim_miss = (img * own_e).sum(-1), (img * miss_e).sum(-1)
    other = [(i, (i + 1) % len(scenes)) for i in range(len(scenes)) if scenes[i] != scenes[(i + 1) % len(scenes)]]
    wins = sum(float(sim_own[i] > img[i] @ own_e[j]) for i, j in other)
    report = {"other_image_pairs": len(other), "beats_other_image_caption": wins / len(other),
              "beats_near_miss": float((sim_own > sim_miss).float().mean())}  # fmt: skip
    _, right = scene_loss(probe, raw, torch.tensor([slot_labels(s) for s in scenes]))
    for j, name in enumerate(("kind", "colour", "size")):
        report[f"readout_{name}_accuracy"] = float(right[:, j::3].float().mean())
    return report


def clip_processor() -> ImageProcessor:
    return ImageProcessor(IMAGE_SIZE, CLIP_MEAN, CLIP_STD, resize="crop")  # as CLIPImageProcessor does


def train_clip(images: int, epochs: int, batch: int, lr: float, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=128))
    probe = torch.nn.Linear(model.config.projection_dim, 3 * sum(SLOT_CLASSES))  # dropped after training
    started = time.perf_counter()
    pixels, scenes, sized = load_images(images, TRAIN, clip_processor())
    labels = torch.tensor([slot_labels(s) for s in scenes])
    steps = epochs * (len(scenes) // batch)
    optimizer = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=lr, weight_decay=0.05)
    schedule = cosine_schedule(optimizer, steps)
    rng = random.Random(seed)
    for step, idx in enumerate(batches(len(scenes), batch, epochs, seed), 1):
        captions = [rng.choice(references(scenes[i])) for i in idx]
        misses = [rng.choice(references(near_miss(scenes[i], rng, sized[i]))) for i in idx]
        model.train()
        img = embeddings_of(model.get_image_features(pixel_values=pixels[idx]))
        contrastive = contrastive_loss(model, img, tokenize(captions + misses))
        supervised, _ = scene_loss(probe, img, labels[idx])
        optimizer_step(contrastive + supervised, model.parameters(), optimizer, schedule)  # the read-out unclipped
        if step % 50 == 0 or step == steps:
            print(f"clip: step {step}/{steps} contrastive {contrastive.item():.4f} scene {supervised.item():.4f} "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    report = {"train_images": len(scenes), "epochs": epochs, "batch": batch, "lr": lr, "steps": steps,
              "train_seconds": round(time.perf_counter() - started), **clip_report(model, probe)}  # fmt: skip
    return model, report


# --- shapes-siglip: captioning ---------------------------------------------------------------------------------


def train_siglip(images: int, epochs: int, batch: int, lr: float, seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from prefixcap.compose import compose
    from prefixcap.interfaces import Batch

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:  # a random tower, loaded the way the quickstart will load it
        SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=False)).save_pretrained(tmp)
        system = compose({"encoder": {"name": "siglip", "checkpoint": tmp}, **CAPTIONER})
    system.encoder.model.requires_grad_(True)
    started = time.perf_counter()
    pixels, scenes, _ = load_images(images, TRAIN, system.encoder.image_processor)
    steps = epochs * (len(scenes) // batch)
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    schedule = cosine_schedule(optimizer, steps)
    rng = random.Random(seed)
    for step, idx in enumerate(batches(len(scenes), batch, epochs, seed), 1):
        system.train()
        ids, mask, labels = system.tokenize([rng.choice(references(scenes[i])) for i in idx], MAX_TEXT)
        loss, _ = system.loss(Batch(pixel_values=pixels[idx], input_ids=ids, attention_mask=mask, labels=labels))
        optimizer_step(loss, system.parameters(), optimizer, schedule)
        if step % 50 == 0 or step == steps:
            print(f"siglip: step {step}/{steps} caption loss {loss.item():.4f} "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    system.eval()
    heldout = [ShapesSource().draw(HELDOUT, i) for i in range(400)]
    captions = system.caption([e.image for e in heldout], max_new_tokens=MAX_TEXT)
    report = {"train_images": len(scenes), "epochs": epochs, "batch": batch, "lr": lr, "steps": steps,
              "train_seconds": round(time.perf_counter() - started), "captioner": CAPTIONER,
              "heldout_exact_scene_accuracy": scene_accuracy(captions, [e.scene for e in heldout])}  # fmt: skip
    return system.encoder.model, report


def save(model, report: dict, out: Path) -> None:
    from transformers import CLIPImageProcessor

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    if "clip" in out.name:  # the scorer loads its tokenizer and preprocessing with the Auto classes
        tok = tiny_tokenizer()
        tok.model_max_length = MAX_TEXT
        tok.save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out)  # fmt: skip
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")


SHIPPED = {"siglip": (32_000, 16), "clip": (16_000, 6)}  # (images, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["siglip", "clip", "both"], default="both")
    parser.add_argument("--images", type=int, help="training images (default: siglip 32,000, clip 16,000)")
    parser.add_argument("--epochs", type=int, help="passes over them (default: siglip 16, clip 6)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    for kind in ("siglip", "clip") if args.kind == "both" else (args.kind,):
        train = train_siglip if kind == "siglip" else train_clip
        images, epochs = SHIPPED[kind]  # what the shipped models were trained with
        model, report = train(args.images or images, args.epochs or epochs, args.batch, args.lr)
        print(json.dumps(report), flush=True)
        streams = {"train_stream": TRAIN, "heldout_stream": HELDOUT}  # of the shapes world; see the docstring
        save(model, {"model": f"shapes-{kind}", **streams, **report}, args.out / f"shapes-{kind}")


if __name__ == "__main__":
    main()

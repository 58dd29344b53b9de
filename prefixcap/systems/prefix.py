"""The prefix captioner: image -> encoder -> connector -> [prefix ; caption embeddings] -> decoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from prefixcap.errors import CompositionError
from prefixcap.interfaces import Batch, Connector, Decoder, Encoder, Loss, System, SystemOutput
from prefixcap.config import GenerateConfig
from prefixcap.systems import PrefixOptions

if TYPE_CHECKING:
    from prefixcap.onnx_parts import OnnxPlan


class PrefixSystem(System):
    accepts_features = True
    def __init__(self, options: PrefixOptions, *, encoder: Encoder | None, connector: Connector | None,
                 decoder: Decoder | None, losses: list[Loss], pretrained: bool = True):  # fmt: skip
        super().__init__()
        for slot, part, example in (("encoder", encoder, "siglip"), ("decoder", decoder, "smollm"),
                                    ("connector", connector, "mlp")):  # fmt: skip
            if part is None:
                article = "an" if slot == "encoder" else "a"
                raise CompositionError(f"the prefix system needs {article} {slot} section (e.g. `{slot}: {example}`)")
        self.encoder, self.connector, self.decoder = encoder, connector, decoder
        self.losses = nn.ModuleList(losses)
        self.num_prefix_tokens = connector.output_tokens(encoder.num_tokens)

    def prefix(self, pixel_values: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        if features is None:
            features = self.encoder(pixel_values)  # (B, 3, S, S) -> (B, N, D)
        return self.connector(features)  # (B, N, D) -> (B, K, H)

    def visual_tokens(self, pixel_values: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        return self.prefix(pixel_values, features)  # the prefix the decoder reads (a subclass's prefix() too)

    def text_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The decoder over [BOS][prompt] text EOS with no prefix in front: (B, T) -> (B, T, H)."""
        # Hidden states come at the positions logits are asked for: all T (the pool reads each row's last real token).
        embeds = self.decoder.embed(input_ids)
        return self.decoder(embeds, attention_mask, num_logits=input_ids.shape[1], return_hidden=True)[1]

    def forward(self, batch: Batch) -> SystemOutput:
        prefix = self.prefix(batch.pixel_values, batch.features)
        text_states = None
        if any(loss.needs_text_states for loss in self.training_losses()):
            text_states = self.text_states(batch.input_ids, batch.attention_mask)
        text = self.decoder.embed(batch.input_ids)  # (B, T, H)
        inputs = torch.cat([prefix.to(text.dtype), text], dim=1)  # (B, K + T, H)
        ones = batch.attention_mask.new_ones(prefix.shape[:2])
        mask = torch.cat([ones, batch.attention_mask], dim=1)
        # Position K-1+t predicts caption token t: keep the last T+1 positions' logits and drop the final one.
        t = batch.input_ids.shape[1]
        if any(loss.needs_hidden for loss in self.training_losses()):
            logits, hidden = self.decoder(inputs, mask, num_logits=t + 1, return_hidden=True)
            return SystemOutput(logits[:, :-1], batch.labels, prefix, hidden=hidden[:, :-1],
                                text_states=text_states)  # (B, T, V), (B, T, H)
        logits = self.decoder(inputs, mask, num_logits=t + 1)[:, :-1]  # (B, T, V)
        return SystemOutput(logits=logits, labels=batch.labels, prefix=prefix, text_states=text_states)

    def attention_maps(self, batch: Batch) -> Tensor:
        """The decoder's attention from the position that predicts each caption token to the K prefix positions,
        spread over the encoder's N tokens by the connector (Connector.source_weights): (B, layers, heads, T, N)."""
        tokens = batch.features if batch.features is not None else self.encoder(batch.pixel_values)  # (B, N, D)
        prefix = self.connector(tokens)  # (B, K, H)
        spread = self.connector.source_weights(tokens)  # (B, K, N)
        text = self.decoder.embed(batch.input_ids)
        inputs = torch.cat([prefix.to(text.dtype), text], dim=1)
        mask = torch.cat([batch.attention_mask.new_ones(prefix.shape[:2]), batch.attention_mask], dim=1)
        k, t = prefix.shape[1], batch.input_ids.shape[1]
        attn = self.decoder.attentions(inputs, mask)[..., k - 1 : k - 1 + t, :k]  # position K-1+t predicts token t
        return attn.float() @ spread.float()[:, None, None]  # (B, L, H, T, K) @ (B, 1, 1, K, N)

    def generation_inputs(self, pixel_values: Tensor) -> Tensor:
        """(B, K + P, H): each image's prefix, then the decoder's prompt embedded; what decoding starts from."""
        prefix = self.prefix(pixel_values)  # (B, K, H)
        prompt = self.decoder.prompt_ids().to(prefix.device)
        prompt = self.decoder.embed(prompt[None].expand(prefix.shape[0], -1))  # (B, P, H)
        return torch.cat([prefix.to(prompt.dtype), prompt], dim=1)

    @torch.inference_mode()
    def generate(self, pixel_values: Tensor, config: GenerateConfig) -> list[str]:
        inputs = self.generation_inputs(pixel_values)
        mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        ids = self.decoder.generate(inputs, mask, config)
        texts = self.decoder.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def onnx_export(self) -> OnnxPlan:
        """vision_encoder: pixel_values -> image_tokens; connector: image_tokens -> prefix_embeds; decoder: the
        prefix (first step only) and the prompt ids, then one token a step, with its KV cache; LoRA merged."""
        from prefixcap.onnx_parts import BATCH_DIMS, Graph, OnnxPlan, Runtime, example_pixels, merge_lora
        from prefixcap.onnx_parts import prefix_decoder_graph

        languages = self.languages
        if languages:  # copies with each language merged; the English one, as every other, without peft's layers
            from prefixcap.languages import merged_model

            lm, merged = merged_model(self.decoder, None), bool(self.decoder.lora_targets)
        else:
            lm, merged = merge_lora(getattr(self.decoder, "model", None))
        pixels = example_pixels(self.encoder)
        with torch.no_grad():
            tokens = self.encoder(pixels)
        graphs = {
            "vision_encoder": Graph(self.encoder, (pixels,), ["pixel_values"], ["image_tokens"], (BATCH_DIMS,)),
            "connector": Graph(self.connector, (tokens,), ["image_tokens"], ["prefix_embeds"], (BATCH_DIMS,)),
            "decoder": prefix_decoder_graph(lm, "prefix_embeds"),
        }
        steps = {}
        for lang in languages:  # one step graph per language: the image graphs are shared
            steps[lang] = f"decoder_{lang.replace('-', '_')}"
            graphs[steps[lang]] = prefix_decoder_graph(merged_model(self.decoder, lang), "prefix_embeds")
        runtime = Runtime(image=["vision_encoder", "connector"], step="decoder", first_step={"prefix_embeds": 1})
        tokenizer = self.decoder.tokenizer
        return OnnxPlan(graphs, runtime, tokenizer=tokenizer, prompt_ids=self.decoder.prompt_ids().tolist(),
                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, lora_merged=merged,
                        languages=steps)  # fmt: skip

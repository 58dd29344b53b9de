"""A transformers causal LM as a prefix decoder: frozen base, LoRA adapters, embeddings in, logits out."""

from __future__ import annotations

import copy
import difflib
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer, __version__
from huggingface_hub.errors import StrictDataclassError
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from prefixcap.checkpoints import TINY, fetch, load_config, snapshot_path
from prefixcap.decoders import CausalLMOptions
from prefixcap.decoding import greedy
from prefixcap.decoders.tokenizer import BOS_ID, EOS_ID, PAD_ID, tiny_tokenizer, tiny_vocab_size
from prefixcap.errors import CompositionError, SavedSystemError, summary
from prefixcap.interfaces import Decoder
from prefixcap.weights import (load_into, module_state, read_adapter, refuse_pickle_weights, save_transformers,
                               trained_names, transformers_names)  # fmt: skip
from prefixcap.config import GenerateConfig

# `checkpoint: tiny` builds the architecture the options state (tiny.model_type, else CausalLMOptions.tiny_config():
# the default checkpoint's config) at the sizes of decoder.tiny, so tests run the same classes users get. The
# vocabulary is the tiny tokenizer's (prefixcap.decoders.tokenizer).
TINY_VOCAB = dict(max_position_embeddings=512, vocab_size=tiny_vocab_size(), bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  pad_token_id=PAD_ID)  # fmt: skip
# Keys of a real checkpoint's config that follow from its sizes or its file, and would contradict a shrunk copy.
DERIVED = ("head_dim", "layer_types", "dtype", "torch_dtype", "quantization_config")
LINEAR = (nn.Linear, Conv1D)  # GPT-2's layers are transformers' Conv1D: a linear layer with the weight transposed


def tiny_config(options: CausalLMOptions) -> dict[str, Any]:
    """The config `checkpoint: tiny` builds: its architecture, at ``options.tiny``'s sizes, each passed only to an
    architecture that has it (GPT-NeoX has no num_key_value_heads)."""
    tiny = options.tiny
    base = {"model_type": tiny.model_type} if tiny.model_type else options.tiny_config()
    model_type = base.get("model_type") if isinstance(base, dict) else None
    if not isinstance(model_type, str):
        raise CompositionError(f"{type(options).__name__}.tiny_config() returned {type(base).__name__}, not a "
                               f"transformers config dict with a model_type")  # fmt: skip
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else " (e.g. llama, qwen2, phi, gpt_neox)"
        raise CompositionError(f"tiny model_type {model_type!r} is no causal LM architecture transformers "
                               f"{__version__} knows{hint}")  # fmt: skip
    defaults = CONFIG_MAPPING[model_type]()  # hasattr follows the config's attribute_map (GPT-2's n_embd, ...)
    sizes = {}
    for key, value in tiny.model_dump(exclude={"model_type"}).items():
        if hasattr(defaults, key):
            sizes[key] = value  # None too: it replaces a real checkpoint's value with the architecture's default
        elif value != type(tiny).model_fields[key].default:  # a default (a saved recipe states them all) is no ask
            raise CompositionError(f"the {model_type} architecture has no {key}: leave decoder.tiny.{key} out")
    return {**{k: v for k, v in base.items() if k not in DERIVED}, **sizes, **TINY_VOCAB}


def attention_linears(model: nn.Module) -> list[str]:
    """The default LoRA targets: names (suffixes, in model order) of the linear layers inside attention modules.

    The prefix reaches the caption through attention only, so adapting all of its projections (q, k, v and output:
    q_proj..o_proj, Phi's dense, GPT-NeoX's fused query_key_value) is the usual choice for captioning; peft's own
    defaults adapt q and v only. transformers has no common attention base class, but names every architecture's
    attention module <Arch>Attention (and its Sdpa/Flash variants), which is what is looked for. Suffixes are what
    peft matches: GPT-2's c_proj names its MLP's output layer too, which is then adapted as well."""
    names: list[str] = []
    for module in model.modules():
        if "Attention" in type(module).__name__:
            names += [n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, LINEAR)]
    return list(dict.fromkeys(names))


def _load_config(options: CausalLMOptions):
    """The architecture config. A checkpoint's own config is read with trust_remote_code as the recipe says, never
    left unset: then transformers would ask on a terminal whether to run the code a config's auto_map names."""
    checkpoint = options.checkpoint
    if checkpoint == TINY:
        tiny = tiny_config(options)
        try:
            return load_config(checkpoint, AutoConfig, tiny)
        except (ValueError, TypeError, StrictDataclassError) as e:  # the architecture's own checks of its config
            raise CompositionError(f"a tiny {tiny['model_type']} of these sizes is no valid config "
                                   f"({summary(e.__cause__ or e)}): change decoder.tiny") from None  # fmt: skip
    if not Path(checkpoint).exists() and snapshot_path(checkpoint).exists():
        return load_config(checkpoint, AutoConfig, {})  # a config prefixcap ships: no code in it

    def load():
        try:
            return AutoConfig.from_pretrained(checkpoint, trust_remote_code=options.trust_remote_code)
        except ValueError as e:
            if options.trust_remote_code or "trust_remote_code" not in str(e):
                raise
            raise CompositionError(
                f"{checkpoint!r} ships its own model code (auto_map in its config.json), which prefixcap runs only "
                f"when the recipe sets trust_remote_code: true on this component; read that code first"
            ) from None

    return fetch(load, checkpoint, "config")


class CausalLMDecoder(Decoder):
    def __init__(self, options: CausalLMOptions, *, pretrained: bool = True):
        super().__init__()
        self.options = options
        self.lr = options.lr
        checkpoint = options.checkpoint
        remote = options.trust_remote_code
        if remote:
            warnings.warn(f"trust_remote_code is on: code shipped with {checkpoint!r} will run", stacklevel=2)
        config = _load_config(options)
        if pretrained and checkpoint != TINY:
            refuse_pickle_weights(checkpoint, beside_safetensors_ok=True)  # say why, before transformers fails
            # safetensors only: transformers would otherwise unpickle a pytorch_model.bin
            model = fetch(lambda: AutoModelForCausalLM.from_pretrained(checkpoint, config=config, use_safetensors=True,
                                                                       trust_remote_code=remote), checkpoint, "weights")
            self._tokenizer = fetch(lambda: AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=remote),
                                    checkpoint, "tokenizer")  # fmt: skip
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=options.trust_remote_code)
            self._tokenizer = tiny_tokenizer() if checkpoint == TINY else None
            self.random_init = checkpoint == TINY
        if self._tokenizer is not None and self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token  # labels mask padding anyway
        self.config = config
        self._targets: list[str] = []
        if options.finetune == "full":
            model.requires_grad_(True)
        else:
            model.requires_grad_(False)
        if options.finetune == "lora":
            model = self._add_lora(model)
        self.model = model

    @classmethod
    def write_tiny_checkpoint(cls, directory: Path, options: CausalLMOptions) -> dict:
        """Save a tiny random model of this decoder's architecture (and the tiny tokenizer) the way the hub
        holds real ones, and return the recipe options that load it through from_pretrained."""
        tiny = cls(options.model_copy(update={"checkpoint": TINY, "finetune": "frozen"}), pretrained=True)
        tiny.model.save_pretrained(directory)
        tiny.tokenizer.save_pretrained(directory)
        # transformers picks the tokenizer class by the config's model type when it loads one (Qwen2's adds
        # <|endoftext|>), so the tokenizer a user gets back can be longer than the tiny vocabulary: give every token
        # a logit, as real checkpoints do, or that token's id would index past the embeddings.
        loaded = len(AutoTokenizer.from_pretrained(directory))
        if loaded > tiny.model.get_input_embeddings().num_embeddings:
            tiny.model.resize_token_embeddings(loaded)
            tiny.model.save_pretrained(directory)
        return {"checkpoint": str(directory)}

    def _add_lora(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        lora = self.options.lora
        targets = lora.targets or attention_linears(model)
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEAR)})
        if not targets:
            raise CompositionError(
                f"no linear layers inside attention modules of this {self.config.model_type} architecture to adapt; "
                f"set decoder.lora.targets to some of: {', '.join(linear_names)}"
            )
        missing = [t for t in targets if t not in linear_names]
        if missing:
            raise CompositionError(
                f"LoRA targets {missing} are not modules of this {self.config.model_type} architecture; "
                f"its linear layers are: {', '.join(linear_names)}"
            )
        self._targets = list(targets)
        # Conv1D stores its weight transposed (in, out): peft must be told, or it warns and works it out itself.
        conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            bias="none", fan_in_fan_out=conv1d)  # fmt: skip
        with warnings.catch_warnings():  # peft calls a transformers API that transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def lora_targets(self) -> list[str]:
        return self._targets

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, T) -> (B, T, H)

    def prompt_ids(self) -> Tensor:
        tok = self._tokenizer
        ids = [tok.bos_token_id] if self.options.add_bos and tok.bos_token_id is not None else []
        if self.options.prompt:
            ids += tok(self.options.prompt, add_special_tokens=False).input_ids
        return torch.tensor(ids, dtype=torch.long)

    def tokenize(self, captions: Sequence[str], max_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        tok = self._tokenizer
        prompt = self.prompt_ids().tolist()
        rows, targets = [], []
        for caption in captions:
            # EOS is appended so the model learns to stop; truncation keeps it, so long captions still end.
            ids = tok(caption.strip(), add_special_tokens=False).input_ids[: max(max_tokens - 1, 0)]
            ids = ids + [tok.eos_token_id]
            rows.append(prompt + ids)
            targets.append([-100] * len(prompt) + ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, target) in enumerate(zip(rows, targets)):
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = torch.tensor(target)
            mask[i, : len(row)] = 1
        return input_ids, mask, labels

    @property
    def base_checkpoint(self) -> str | None:
        """The base a saved adapter names (adapter_config.json's base_model_name_or_path): the checkpoint as the recipe
        states it, a hub id or a local directory; None for a random base, which is saved whole beside the adapter."""
        return None if self.options.checkpoint == TINY else self.options.checkpoint

    def _base(self) -> nn.Module:
        """The transformers model, under the LoRA layers if any."""
        return self.model.get_base_model() if self.options.finetune == "lora" else self.model

    def _base_names(self) -> dict[str, str]:
        """The transformers model's tensors: name in this component -> name in the model (under LoRA, peft's wrapping
        undone and LoRA's own tensors left out, language adapters' too)."""
        prefix = "model.base_model.model." if self.options.finetune == "lora" else "model."
        names = {}
        for name in self.state_dict():
            parts = name.removeprefix(prefix).split(".")
            if not any(part.startswith(("lora_", "trainable_tokens_")) for part in parts):  # adapters: languages too
                names[name] = ".".join(part for part in parts if part not in ("base_layer", "token_adapter"))
        return names

    def save_trained(self, directory: Path) -> list[str]:
        """The decoder as Hugging Face keeps one: a whole model (full fine-tuning, or a random base that cannot be
        fetched again) in transformers' format, LoRA as a peft adapter, and the tokenizer, so that the folder loads
        with plain transformers or peft."""
        lora, whole = self.options.finetune == "lora", self.random_init or self.options.finetune == "full"
        if not (lora or whole):
            return super().save_trained(directory)  # frozen: nothing trained, the base is fetched again
        directory.mkdir(parents=True, exist_ok=True)
        if whole:
            names = self._base_names()
            state = module_state(self, everything=True)  # tied tensors once, as transformers saves them
            save_transformers(self._base(), {names[k]: v for k, v in state.items() if k in names}, directory)
        if lora:
            self._save_adapter(directory)
        if self._tokenizer is not None:
            self._tokenizer.save_pretrained(directory)
        return sorted(p.name for p in directory.iterdir() if p.is_file())

    def _save_adapter(self, directory: Path) -> None:
        # peft would name as the base whatever directory the model came from (a plugin's local conversion of a GGUF,
        # say) and no task; with the base the recipe names and CAUSAL_LM, PeftModel.from_pretrained gives a
        # PeftModelForCausalLM and transformers' from_pretrained of the folder finds the base by itself. LoRA targets
        # linear layers only, so the embeddings are the base's: saying so spares peft asking the hub at every save
        # whether the base's vocabulary differs.
        config = self.model.peft_config["default"]
        saved = copy.copy(config)
        saved.base_model_name_or_path, saved.task_type = self.base_checkpoint, "CAUSAL_LM"
        self.model.peft_config["default"] = saved
        from prefixcap.languages import peft_saving

        try:
            with peft_saving(self.model, "default"):  # language adapters go to adapters/<name>/ (prefixcap.languages)
                self.model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False,
                                           selected_adapters=["default"])  # fmt: skip
        finally:
            self.model.peft_config["default"] = config

    def load_trained(self, directory: Path) -> None:
        lora = self.options.finetune == "lora"
        if (directory / "config.json").exists():  # a transformers model: full fine-tuning, or a random base
            inside, state = self._base_names(), self.state_dict()
            on_disk = transformers_names(self._base(), {name: state[k] for k, name in inside.items()})
            load_into(self, directory / "model.safetensors", {k: on_disk[name] for k, name in inside.items()},
                      expected=trained_names(self) & set(inside))  # fmt: skip
            if not lora:
                return
        elif not lora or (directory / "model.safetensors").exists():  # saved before issue 21, under this part's names
            return super().load_trained(directory)
        elif self.random_init:  # the adapter alone would sit on a new random base
            raise SavedSystemError(f"{directory}: no config.json and model.safetensors for this decoder's random base")
        adapter = directory / "adapter_model.safetensors"
        if not adapter.exists():
            raise SavedSystemError(f"{directory}: no adapter_model.safetensors for this LoRA decoder")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, read_adapter(adapter))
        if result.unexpected_keys:
            raise SavedSystemError(f"{adapter}: tensors {result.unexpected_keys[:5]} do not fit this decoder")

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, num_logits: int | None = None,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        # Only the positions that predict caption tokens need logits: with a 196-token prefix and a 49k
        # vocabulary, the rest would be most of the lm_head's cost.
        # Positions count real tokens only, so left padding (or none) gives the same positions as right padding.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=num_logits or 0,
                         output_hidden_states=return_hidden)  # fmt: skip
        if not return_hidden:
            return out.logits  # (B, L', V)
        hidden = out.hidden_states[-1]
        return out.logits, hidden[:, -num_logits:] if num_logits else hidden

    def generate(self, inputs_embeds: Tensor, attention_mask: Tensor, config: GenerateConfig) -> Tensor:
        tok = self._tokenizer
        if config.fast_greedy and bool(attention_mask.all()):  # the prefix system never pads
            return greedy(self.model, inputs_embeds, max_new_tokens=config.max_new_tokens, eos_id=tok.eos_token_id,
                          pad_id=tok.pad_token_id, compile=config.compile)  # fmt: skip
        sampling = {}
        if config.do_sample:  # greedy unless asked: alt text should not change from one run to the next
            sampling = dict(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        return self.model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=config.max_new_tokens,
            num_beams=config.num_beams, do_sample=config.do_sample, repetition_penalty=config.repetition_penalty,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sampling,
        )  # (B, T_new): with only embeddings as input, generate returns just the new tokens

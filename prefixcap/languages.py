"""Captions in other languages: a named LoRA adapter per language on a trained, frozen system.

A language adapter is peft's: LoRA on the decoder's attention and MLP layers, plus peft's trainable tokens for the
embeddings of the tokens that language's captions use (the tiny tokenizer has a token for each German, French or
Russian shapes word, which an English model only ever learnt to score low). Adapters are injected beside the base
layers (peft.inject_adapter_in_model), several at once; one is active per call. With none active every adapted layer
is its base layer alone, so English is the computation it was before any adapter was added, bit for bit.

    saved/adapters/de/adapter_config.json, adapter_model.safetensors    peft's format, one folder per language
    saved/manifest.json  "languages": {"de": {"parameters": ..., "share": ..., "metrics": {...}}}

Training one: a recipe with ``base:`` (a run or a saved system) and ``language:`` (prefixcap.config.LanguageConfig);
prefixcap.training.run.start_from_base loads the base and adds the adapter; the run trains only it and saves base +
adapters as a new system.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from torch import nn

from prefixcap.config import is_language_tag
from prefixcap.errors import CompositionError, SavedSystemError

ENGLISH = "en"  # the base system's own language: no adapter
MLP_HINTS = ("MLP", "FeedForward", "Mlp")  # transformers' MLP modules: LlamaMLP, PhiMLP, GPT2MLP, ...


def check_tag(name: Any, where: str) -> str:
    if not is_language_tag(name):
        raise CompositionError(f"{where}: language {name!r} is no language tag like de, fr, ru or pt-br (and en is "
                               "the base system itself, no adapter)")  # fmt: skip
    return name


def linear_names(model: nn.Module, kinds: Sequence[str], linear: tuple[type, ...]) -> list[str]:
    """Suffixes of the linear layers inside modules whose class names contain one of ``kinds``, in model order."""
    names: list[str] = []
    for module in model.modules():
        if any(kind in type(module).__name__ for kind in kinds):
            for n, m in module.named_modules():
                parts = n.split(".")
                if not n or not isinstance(m, linear) or any(p.startswith(("lora_", "trainable_tokens_")) for p in parts):
                    continue  # an adapter's own layers: a language added after another adapts the base layers again
                names.append([p for p in parts if p != "base_layer"][-1])
    return list(dict.fromkeys(names))


def lora_config(options: Any, attention: list[str], mlp: list[str], token_ids: Sequence[int], embeddings: str):
    """peft's LoraConfig for a language: ``options.r`` on the attention layers, ``options.mlp_r`` on the MLP's (0:
    none), trainable tokens on ``embeddings`` for ``token_ids``."""
    from peft import LoraConfig

    mlp = [m for m in mlp if m not in attention] if options.mlp_r else []
    rank = {name: options.mlp_r for name in mlp}
    return LoraConfig(r=options.r, lora_alpha=2 * options.r, lora_dropout=0.0, target_modules=attention + mlp,
                      rank_pattern=rank, alpha_pattern={k: 2 * v for k, v in rank.items()}, bias="none",
                      trainable_token_indices={embeddings: sorted(set(token_ids))} if token_ids else None)  # fmt: skip


def tuner_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def peft_saving(model: nn.Module, adapter: str) -> Iterator[None]:
    """While ``adapter`` is saved with peft: its get_peft_model_state_dict asks every trainable-tokens wrapper for
    that adapter's tokens and fails on one that has none (peft 0.21; a LoRA base's own adapter beside a language
    that trains tokens, or a language that trains none beside one that does). Those wrappers give nothing meanwhile."""
    from peft.utils.other import TrainableTokensWrapper

    patched = [m for m in model.modules() if isinstance(m, TrainableTokensWrapper)
               and adapter not in m.token_adapter.trainable_tokens_delta]  # fmt: skip
    for module in patched:
        module.adapter_state_dict = lambda name, state: {}
    try:
        yield
    finally:
        for module in patched:
            del module.adapter_state_dict


def inject(model: nn.Module, config: Any, name: str) -> None:
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # a second adapter is the point here, not a mistake
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(config, model, adapter_name=name)


def activate(model: nn.Module, names: Sequence[str]) -> None:
    """Make ``names`` the active adapters of every adapted layer (each layer takes those it has; a layer with none
    is its base layer alone). requires_grad is left as it was: peft's set_adapter would make the active ones train."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for layer in tuner_layers(model):
        mine = [n for n in names if n in layer._all_available_adapter_names()]
        layer.enable_adapters(bool(mine))
        if mine:
            layer.set_adapter(mine)
    for p, flag in flags:
        p.requires_grad_(flag)


def seed_tokens(model: nn.Module, tokenizer: Any, name: str, glossary: Mapping[str, str]) -> int:
    """Adapter ``name``'s trainable rows of glossed words set to their English words' base rows: a row the base
    never trained is random, while "red"'s row is where the base's grounding already points for a red shape. A word
    or its English that is more than one token, in either spacing (caption-initial or not), is left as it is."""
    import torch
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    source: dict[int, int] = {}
    for word, english in glossary.items():
        for space in ("", " "):
            ids, english_ids = (tokenizer(space + w, add_special_tokens=False).input_ids for w in (word, english))
            if len(ids) == 1 and len(english_ids) == 1:
                source[ids[0]] = english_ids[0]
    seeded: set[int] = set()
    for layer in model.modules():
        if isinstance(layer, TrainableTokensLayer) and not layer.tied_adapter and name in layer.trainable_tokens_delta:
            weight, delta = layer.get_base_layer().weight, layer.trainable_tokens_delta[name]
            with torch.no_grad():
                for row, token in enumerate(layer.token_indices[name]):
                    if token in source:
                        delta[row] = weight[source[token]]
                        seeded.add(token)
    return len(seeded)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The tensors of adapter ``name``: LoRA's lora_A/B.<name> and trainable tokens' delta.<name>."""
    return [p for n, p in model.named_parameters() if n.endswith(f".{name}") or f".{name}." in n
            if "lora_" in n or "trainable_tokens_" in n]  # fmt: skip


def read_adapter_config(directory: Path, name: str, model: nn.Module):
    """adapter_config.json of a saved language, as a LoraConfig, after checking it is one this decoder can take: the
    file is a stranger's, and peft would build whatever modules it names."""
    from peft import LoraConfig

    path = directory / "adapter_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SavedSystemError(f"{path}: cannot read language {name!r}'s adapter config: {e}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise SavedSystemError(f"{path}: not a LoRA adapter config (peft_type {data.get('peft_type')!r})"
                               if isinstance(data, dict) else f"{path}: not a JSON object")  # fmt: skip
    targets = data.get("target_modules")
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t in present for t in targets):
        raise SavedSystemError(f"{path}: target_modules {targets!r} are not layers of this decoder")
    if data.get("use_dora") is not False and data.get("use_dora") is not None:
        raise SavedSystemError(f"{path}: use_dora must be false for a language adapter")
    keep = {k: v for k, v in data.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"}
    try:
        return LoraConfig(**keep)
    except (TypeError, ValueError) as e:
        raise SavedSystemError(f"{path}: {e}") from None


@contextlib.contextmanager
def only_language_trains(system: nn.Module, name: str) -> Iterator[None]:
    """Gradients for adapter ``name`` alone while it trains, every flag restored after: the base parts keep saying
    what they train, which is what saving them reads."""
    params = {id(p) for p in system.decoder.language_parameters(name)}
    flags = [(p, p.requires_grad) for p in system.parameters()]
    for p in system.parameters():
        p.requires_grad_(id(p) in params)
    try:
        with caption_losses_only(system):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def caption_losses_only(system: nn.Module) -> Iterator[None]:
    """System.training_losses leaves the embedding losses out inside: their heads read English text, frozen."""
    before = system.__dict__.get("_language_run")
    system.__dict__["_language_run"] = True
    try:
        yield
    finally:
        system.__dict__["_language_run"] = before


def caption_token_ids(tokenizer: Any, captions: Iterator[str]) -> list[int]:
    """Every token id the captions use, and EOS: what a language's trainable tokens cover. A set of ids, bounded by
    the vocabulary however many captions stream past."""
    seen = {tokenizer.eos_token_id}
    for caption in captions:
        seen.update(tokenizer(caption.strip(), add_special_tokens=False).input_ids)
    return sorted(i for i in seen if i is not None)


# --- what Decoder's language methods do (prefixcap.interfaces), for the transformers model inside a decoder -------


def add_language(decoder: Any, options: Any, token_ids: Sequence[int], config: Any = None) -> None:
    from transformers.pytorch_utils import Conv1D

    name = check_tag(options.name if config is None else options, "add_language")
    if name in decoder.languages:
        raise CompositionError(f"this system has a {name!r} language adapter already")
    model = decoder._language_model()
    if not decoder.languages:  # what is active before any language: a LoRA-trained base's own adapter, or nothing
        active = {n for layer in tuner_layers(model) if not layer.disable_adapters for n in layer.active_adapters}
        decoder.__dict__["_base_adapters"] = sorted(active)
    if config is None:
        linear = (nn.Linear, Conv1D)
        attention = linear_names(model, ("Attention",), linear)
        mlp = linear_names(model, MLP_HINTS, linear)
        if not attention:
            raise CompositionError(f"no attention layers found in this {type(model).__name__} to adapt")
        embeddings = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        config = lora_config(options, attention, mlp, token_ids if options.tokens else (), embeddings.rsplit(".")[-1])
        config.fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules()
                                    if n.rsplit(".", 1)[-1] in config.target_modules)  # fmt: skip
    flags = [(p, p.requires_grad) for p in model.parameters()]
    inject(model, config, name)
    for p, flag in flags:  # the base trains as it did; the new adapter trains only when asked (only_language_trains)
        p.requires_grad_(flag)
    for p in adapter_parameters(model, name):
        p.requires_grad_(False)
    decoder.__dict__.setdefault("_language_configs", {})[name] = config
    active = decoder.language
    decoder.__dict__["_language"] = "\0"  # force the switch: peft leaves a new adapter active in the layers it adds
    decoder.set_language(active)


def save_language(decoder: Any, name: str, directory: Path) -> list[str]:
    from peft.utils import get_peft_model_state_dict

    from prefixcap.weights import save_tensors

    model = decoder._language_model()
    config = decoder.__dict__["_language_configs"][name]
    with peft_saving(model, name):
        state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().contiguous().cpu() for k, v in state.items()}, directory / "adapter_model.safetensors")
    data = config.to_dict()
    data["base_model_name_or_path"], data["task_type"] = getattr(decoder, "base_checkpoint", None), "CAUSAL_LM"
    (directory / "adapter_config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=list) + "\n")
    return ["adapter_config.json", "adapter_model.safetensors"]


def load_language(decoder: Any, name: str, directory: Path) -> None:
    from peft.utils import set_peft_model_state_dict

    from prefixcap.weights import read_adapter

    check_tag(name, str(directory))
    model = decoder._language_model()
    if name not in decoder.languages:
        decoder.add_language(name, config=read_adapter_config(directory, name, model))
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise SavedSystemError(f"{path} is missing: language {name!r} has no weights")
    state = read_adapter(path)
    expected = {n for n, _ in model.named_parameters() if n in {p_name for p_name in _names(model, name)}}
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    if result.unexpected_keys:
        raise SavedSystemError(f"{path}: tensors {result.unexpected_keys[:5]} do not fit this decoder")
    missing = [k for k in result.missing_keys if k in expected]
    if missing:
        raise SavedSystemError(f"{path}: language {name!r} lacks {missing[:5]}")


def _names(model: nn.Module, name: str) -> list[str]:
    ids = {id(p) for p in adapter_parameters(model, name)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def merged_model(decoder: Any, name: str | None) -> nn.Module:
    """A copy of the decoder's transformers model with the base's own adapters and language ``name`` (None: English)
    folded into its weights and every peft layer gone: what an ONNX export writes, one per language."""
    import copy

    from peft.utils.other import TrainableTokensWrapper

    model = copy.deepcopy(decoder._language_model())  # deepcopy keeps tied tensors tied
    wanted = [*decoder.__dict__.get("_base_adapters", []), *([name] if name else [])]
    activate(model, wanted)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, TrainableTokensWrapper):
                layer = child.token_adapter
                mine = [n for n in wanted if n in layer.trainable_tokens_delta]
                if mine and not layer.tied_adapter:  # a tied head shares the embedding's weight, merged once there
                    layer.merge(adapter_names=mine)
                setattr(parent, child_name, layer.get_base_layer())
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):  # a LoRA layer: fold its active adapters in, keep the base layer
                mine = [n for n in wanted if n in child._all_available_adapter_names()]
                if mine:
                    child.merge(adapter_names=mine)
                setattr(parent, child_name, child.get_base_layer())
    model.__dict__.pop("peft_config", None)
    return model

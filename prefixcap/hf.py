"""Saved systems through transformers' Auto classes and pipelines: ``import prefixcap.hf`` registers them.

    import prefixcap.hf  # noqa: F401   registers model type "prefixcap" with transformers
    from transformers import AutoModelForImageTextToText, pipeline

    model = AutoModelForImageTextToText.from_pretrained("runs/quickstart/final")   # or a hub id, user/repo
    model.caption(images)                                  # -> ["a red circle ...", ...], as prefixcap.load does
    pipe = pipeline("alt-text", model="runs/quickstart/final")
    pipe(image)                                            # -> [{"generated_text": "a red circle ..."}]
    pipe = pipeline("image-text-to-text", model="runs/quickstart/final")
    pipe(image, text="")                                   # -> [{"input_text": "", "generated_text": ...}]

Every saved system's folder holds a config.json (prefixcap.hf_config) naming model type "prefixcap" and no code
(no auto_map): transformers finds the classes below only once this module is imported, and never fetches code to
run. The model loads through prefixcap.persist.load_system, so its rules hold here too: weights from safetensors
only, and a recipe that sets trust_remote_code is refused (there is no way to switch it on from here; load such a
system with prefixcap.load(..., trust_remote_code=True) and wrap it with PrefixcapForImageTextToText.from_system).
A hub id is downloaded with prefixcap.hub's allow-list (safetensors, JSON, text: never a pickle).

Importing prefixcap does not import this module (nor torch): `prefixcap plugins` stays fast.
"""

from __future__ import annotations

import copy
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, BatchFeature, GenerationConfig,
                          Pipeline, PreTrainedConfig, PreTrainedModel, ProcessorMixin)
from transformers.pipelines import PIPELINE_REGISTRY

from prefixcap.config import GenerateConfig
from prefixcap.hf_config import ARCHITECTURE, MODEL_TYPE
from prefixcap.persist import load_system

TASK = "alt-text"
_UNEVEN_TEXTS = "texts of different lengths in one batch: give them one at a time (batch_size=1)"
# Generation options transformers callers pass that a prefixcap system sets for itself (the special tokens are its
# tokenizer's) or that mean nothing to it; anything else it cannot honour is refused rather than ignored.
_SET_BY_THE_SYSTEM = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                                "transformers_version", "use_cache"})  # fmt: skip
# from_pretrained keywords that the Auto classes and pipeline() pass along and that have no effect on a saved system.
# trust_remote_code is among them: a config.json of ours names no code, and the recipe's own switch stays off.
_LOAD_PASSTHROUGH = frozenset({"_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "proxies",
                               "code_revision", "use_safetensors", "low_cpu_mem_usage", "_commit_hash"})  # fmt: skip


class PrefixcapConfig(PreTrainedConfig):
    """What config.json says: the system's kind and the saved format. Weights and recipe are in manifest.json."""

    model_type = MODEL_TYPE

    def __init__(self, system: str | None = None, prefixcap_format: str | None = None, **kwargs: Any):
        self.system = system
        self.prefixcap_format = prefixcap_format
        super().__init__(**kwargs)


def _saved_dir(name: str | Path, subfolder: str = "", **hub: Any) -> Path:
    """The local folder of a saved system: ``name`` itself when it is a directory, else the snapshot of the hub
    repository it names, downloaded (or read from the cache) with prefixcap.hub's allow-list of file types."""
    if Path(name).is_dir():
        return Path(name) / subfolder
    from huggingface_hub import snapshot_download

    from prefixcap.hub import ALLOW_PATTERNS

    hub = {k: v for k, v in hub.items() if v is not None}
    return Path(snapshot_download(str(name), allow_patterns=ALLOW_PATTERNS, library_name="prefixcap", **hub)) / subfolder


# The systems the model class loaded, by folder and manifest stamp: pipeline() loads the model, then the processor
# from the same folder, and the processor's tokenizer and image preprocessing are the model's; without this it would
# build the whole system a second time. Weak: a system lives only as long as a model holds it.
_LOADED: weakref.WeakValueDictionary[tuple[str, int], Any] = weakref.WeakValueDictionary()


def _stamp(directory: Path) -> tuple[str, int]:
    return str(directory.resolve()), (directory / "manifest.json").stat().st_mtime_ns


def _load(directory: Path, device: Any = None) -> Any:
    system = load_system(directory, device)  # every check of prefixcap.load; trust_remote_code stays off
    _LOADED[_stamp(directory)] = system
    return system


def _device(device_map: Any) -> Any:
    """The one device a ``device_map`` names (a prefixcap system is not split across devices)."""
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else None
    if device_map is None or isinstance(device_map, (str, int, torch.device)):
        return device_map
    raise ValueError(f"device_map={device_map!r}: a prefixcap system runs on one device; name it, e.g. 'cuda:0'")


class PrefixcapForImageTextToText(PreTrainedModel):
    """A saved prefixcap system (``.system``) as a transformers model: from_pretrained, generate, save_pretrained.

    generate(pixel_values) returns the caption's token ids (decode them with ``.tokenizer``, skipping special
    tokens); with input_ids (a text to continue, as image-text-to-text passes it) those ids, then the continuation.
    Generation options default to the recipe's generate section (``.generation_config`` holds them). Training goes
    through prefixcap (`prefixcap run`), not through this class: it has no forward."""

    config_class = PrefixcapConfig
    base_model_prefix = "system"
    main_input_name = "pixel_values"

    def __init__(self, config: PrefixcapConfig, system: Any = None):
        super().__init__(config)
        self.post_init()  # before the system is attached: post_init may (re)initialise the weights it can see
        self.system = system

    @classmethod
    def can_generate(cls) -> bool:
        return True  # its own generate(), not GenerationMixin's: pipelines then pass generation options through

    @classmethod
    def from_system(cls, system: Any, config: PrefixcapConfig | None = None) -> PrefixcapForImageTextToText:
        """Wrap a system already built or loaded (e.g. by prefixcap.load); it is put in eval mode."""
        if config is None:
            config = PrefixcapConfig(system=system.recipe.system.name, architectures=[ARCHITECTURE])
        model = cls(config, system)
        generate = system.generate_config
        sampling = dict(temperature=generate.temperature, top_p=generate.top_p, top_k=generate.top_k)
        model.generation_config = GenerationConfig(
            max_new_tokens=generate.max_new_tokens, num_beams=generate.num_beams, do_sample=generate.do_sample,
            repetition_penalty=generate.repetition_penalty, **(sampling if generate.do_sample else {}))
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any,
                        config: PrefixcapConfig | None = None, cache_dir: str | Path | None = None,
                        force_download: bool = False, local_files_only: bool = False, token: str | bool | None = None,
                        revision: str | None = None, subfolder: str = "", dtype: Any = None, torch_dtype: Any = None,
                        device_map: Any = None, **kwargs: Any) -> PrefixcapForImageTextToText:  # fmt: skip
        """Load a saved system: a local folder (a run's final/) or a hub id. It is rebuilt by prefixcap.persist from
        its manifest (base checkpoints, then the trained safetensors), in float32, on ``device_map``'s one device."""
        unknown = sorted(set(kwargs) - _LOAD_PASSTHROUGH)
        if model_args or unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no {', '.join(unknown) or 'positional arguments'}")
        dtype = dtype if dtype is not None else torch_dtype
        if dtype not in (None, "auto", torch.float32, "float32"):
            raise ValueError(f"dtype={dtype}: a prefixcap system loads in float32 (its base checkpoints' parts as "
                             "prefixcap builds them); move it with .to() once loaded")  # fmt: skip
        directory = _saved_dir(pretrained_model_name_or_path, subfolder, cache_dir=cache_dir, revision=revision,
                               token=token, force_download=force_download or None,
                               local_files_only=local_files_only or None)  # fmt: skip
        model = cls.from_system(_load(directory, _device(device_map)), config)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        return model

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Save the system as prefixcap saves it (manifest, trained safetensors, config.json, card), so that
        from_pretrained and prefixcap.load both read it back."""
        if push_to_hub:
            raise ValueError("push_to_hub: save the system, then upload it with `prefixcap push DIR user/repo`")
        self.system.save(save_directory)

    @property
    def tokenizer(self) -> Any:
        return self.system.decoder.tokenizer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a prefixcap system trains through prefixcap (`prefixcap run`); this model class "
                                  "captions: call generate() or caption()")  # fmt: skip

    def caption(self, images: Sequence[Any], **generate: Any) -> list[str]:
        """Alt text for images (PIL images, arrays, paths), as System.caption writes it."""
        pixel_values = self.system.encoder.preprocess(images)
        return self.decode(self.generate(pixel_values, **generate))

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids from generate() -> text, as the system decodes its own captions."""
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate_options(self, generation_config: GenerationConfig | None = None, **kwargs: Any) -> GenerateConfig:
        """prefixcap's generation settings: the model's generation_config, then ``generation_config``, then the
        keyword arguments, each over the one before (as transformers' generate reads them)."""
        values = self.system.generate_config.model_dump()
        sources = [self.generation_config.to_diff_dict(), generation_config.to_diff_dict() if generation_config
                   else {}, kwargs]  # fmt: skip
        for source in sources:
            for key, value in source.items():
                if key in _SET_BY_THE_SYSTEM or key.startswith("_") or (key == "return_dict_in_generate" and not value):
                    continue
                if key not in GenerateConfig.model_fields:
                    raise ValueError(f"generation option {key}={value!r}: a prefixcap system takes "
                                     f"{', '.join(GenerateConfig.model_fields)}")  # fmt: skip
                values[key] = value
        return GenerateConfig.model_validate(values)

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 **kwargs: Any) -> torch.Tensor:  # fmt: skip
        """(B, 3, S, S) preprocessed images -> (B, T) token ids: ``input_ids`` (a text the caption continues), then
        the caption's new tokens, padded after its end."""
        config = self.generate_options(generation_config, **kwargs)
        pixel_values = pixel_values.to(self.device, torch.float32)
        text = input_ids.to(self.device) if input_ids is not None and input_ids.shape[-1] else None
        if text is not None and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(_UNEVEN_TEXTS)
        system = self.system
        if hasattr(system, "generation_inputs"):  # a prefix system: its decoder continues from the embeddings
            inputs = system.generation_inputs(pixel_values)  # (B, K + P, H): image prefix, then the recipe's prompt
            if text is not None:
                inputs = torch.cat([inputs, system.decoder.embed(text).to(inputs.dtype)], dim=1)
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
            new = system.decoder.generate(inputs, mask, config)
        else:  # another system (crossattn) writes text: its tokens are those of its captions
            if text is not None:
                raise ValueError(f"a {type(system).__name__} cannot continue a text; pass text=''")
            new = self._token_ids(system.generate(pixel_values, config))
        return new if text is None else torch.cat([text, new.to(text.device)], dim=1)

    def _token_ids(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, T) ids, right-padded: for a system whose generate returns text, ids that decode back to
        it (special tokens skipped), so that pipelines read every system the same way."""
        tok = self.tokenizer
        rows = [tok(c, add_special_tokens=False).input_ids for c in captions]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(rows), max(map(len, rows), default=0)), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids.to(self.device)


class PrefixcapProcessor(ProcessorMixin):
    """What image-text-to-text needs beside the model: images -> pixel_values by the encoder's own preprocessing,
    text -> input_ids (the caption's beginning, usually ""), ids -> text. From the system the model class loaded."""

    def __init__(self, system: Any):
        super().__init__()
        # A copy: pipelines set the padding side of the tokenizer they are given, and the system trains with its own.
        self.tokenizer = copy.deepcopy(system.decoder.tokenizer)
        self.preprocess = system.encoder.preprocess

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, cache_dir: str | Path | None = None,
                        revision: str | None = None, token: str | bool | None = None, subfolder: str = "",
                        local_files_only: bool = False, **kwargs: Any) -> PrefixcapProcessor:  # fmt: skip
        directory = _saved_dir(pretrained_model_name_or_path, subfolder, cache_dir=cache_dir, revision=revision,
                               token=token, local_files_only=local_files_only or None)  # fmt: skip
        system = _LOADED.get(_stamp(directory))
        return cls(system if system is not None else _load(directory))

    def __call__(self, images: Any = None, text: str | list[str] | None = None, return_tensors: str = "pt",
                 **kwargs: Any) -> BatchFeature:  # fmt: skip
        if images is None:
            raise ValueError("a prefixcap system captions images: pass one or more")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        texts = [text or ""] * len(images) if text is None or isinstance(text, str) else list(text)
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        rows = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        if len({len(row) for row in rows}) > 1:  # padding would sit between the image's prompt and the text
            raise ValueError(_UNEVEN_TEXTS)
        ids = torch.tensor(rows, dtype=torch.long)  # (B, T); T is 0 for text=""
        return BatchFeature({"pixel_values": self.preprocess(images), "input_ids": ids,
                             "attention_mask": torch.ones_like(ids)}, tensor_type=return_tensors)  # fmt: skip

    def post_process_image_text_to_text(self, generated_outputs: torch.Tensor, skip_special_tokens: bool = True,
                                        **kwargs: Any) -> list[str]:  # fmt: skip
        ids = generated_outputs if generated_outputs.ndim == 2 else generated_outputs[None]
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)]


class AltTextPipeline(Pipeline):
    """Task "alt-text": image(s) in, [{"generated_text": caption}] out for each, as transformers 4's image-to-text
    pipeline answered (transformers 5 sends that task to image-text-to-text, which requires a text).

    Images are PIL images, arrays or local file paths (read by prefixcap.images, with its limits); URLs are not
    fetched. Generation options (max_new_tokens, num_beams, ...) go to the call or to pipeline()."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def __init__(self, model: PrefixcapForImageTextToText, tokenizer: Any = None, **kwargs: Any):
        if not isinstance(model, PrefixcapForImageTextToText):
            raise TypeError(f"the {TASK} pipeline captions with prefixcap systems, not a {type(model).__name__}")
        # With batch_size > 1 the pipeline collates by its tokenizer and image processor: a copy of the system's
        # tokenizer (as in PrefixcapProcessor) and the encoder's preprocessing, whose images all have one size.
        kwargs.setdefault("image_processor", model.system.encoder.preprocessing)
        super().__init__(model, tokenizer=tokenizer or copy.deepcopy(model.tokenizer), **kwargs)

    def _sanitize_parameters(self, max_new_tokens: int | None = None, generate_kwargs: dict | None = None,
                             **kwargs: Any) -> tuple[dict, dict, dict]:  # fmt: skip
        generate = {**(generate_kwargs or {}), **kwargs}
        if max_new_tokens is not None:
            generate["max_new_tokens"] = max_new_tokens
        return {}, {"generate_kwargs": generate}, {}

    def preprocess(self, image: Any) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.model.system.encoder.preprocess([image])}

    def _forward(self, model_inputs: dict[str, torch.Tensor], generate_kwargs: dict | None = None) -> dict:
        kwargs = self._prepare_generate_kwargs(generate_kwargs or {})
        return {"ids": self.model.generate(model_inputs["pixel_values"], **kwargs)}

    def postprocess(self, model_outputs: dict) -> list[dict[str, str]]:
        return [{"generated_text": text} for text in self.model.decode(model_outputs["ids"])]


AutoConfig.register(MODEL_TYPE, PrefixcapConfig, exist_ok=True)
AutoModelForImageTextToText.register(PrefixcapConfig, PrefixcapForImageTextToText, exist_ok=True)
AutoProcessor.register(PrefixcapConfig, PrefixcapProcessor, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=AltTextPipeline, pt_model=AutoModelForImageTextToText,
                                    type="image")  # fmt: skip

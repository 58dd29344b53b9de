"""Caption images with an exported system (prefixcap.export) on onnxruntime, with numpy, PIL and tokenizers only.

    captioner = OnnxCaptioner("exported/quickstart")          # int8=True: the dynamically quantised graphs
    captioner.caption([Image.open("photo.jpg").convert("RGB")])

Nothing here imports torch (a test checks it), so a deployment needs neither torch nor transformers.

What runs, and in which order, is the manifest's "runtime" section (prefixcap.onnx_spec): the graphs run once per
image, then the step graph once per token, fed the image graphs' outputs its runtime names (on every step, or on the
first only: a prefix) and its own cache. Nothing here knows which system wrote the export. A prefixcap-onnx/1
manifest, written before systems declared their runtime, is read as the runtime its system name (prefix or
crossattn) implied.

An export directory may come from anyone: its manifest is validated before anything is opened (every section the
captioner reads; every graph, input and output the runtime names, and how they connect), the files it names must lie
inside the directory, and a graph or tokenizer the runtime cannot load is an ExportError naming the file, not a
library's traceback.

Pixels are made as prefixcap.images.ImageProcessor makes them, from the manifest's numbers: RGB / 255, resized,
clamped to [0, 1], centre-cropped (squash, crop) or centred on the fill colour (letterbox), normalised; ``resize``
(OnnxCaptioner's, or caption's for one call) picks another mode than the manifest's. ImageProcessor resizes with
torch (bicubic, antialiased, on floats); here PIL's float-mode BICUBIC does it, which agrees to ~2e-5 in [0, 1] but
not bit for bit, so a caption of an image that needs resizing can differ from PyTorch's where two tokens are nearly
tied. An image already at the model's input size is not resampled by either, and its pixels are identical.

Decoding is greedy (the recipes' default): with the KV cache, until every caption has ended with EOS or
``max_new_tokens`` (default: the recipe's) tokens were written; text is decoded as transformers decodes it (special
tokens skipped, whitespace stripped).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import onnxruntime as ort
from PIL import Image
from pydantic import (BaseModel, Field, NonNegativeInt, PositiveFloat, PositiveInt, StringConstraints, ValidationError,
                      field_validator)
from tokenizers import Tokenizer

from prefixcap import checkpoints
from prefixcap.errors import summary
from prefixcap.onnx_spec import ATTENTION_MASK, FORMAT, INPUT_IDS, LEGACY_FORMAT, LOGITS, PIXELS, ExportError, Runtime

# transformers' clean_up_tokenization (tokenization_utils_base), for tokenizers whose decode applies it; the export
# decodes CLEAN_UP_PROBE both ways to find out.
CLEAN_UPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # fmt: skip
CLEAN_UP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're"


class ValueSpec(BaseModel):
    name: str
    dtype: str
    shape: list[NonNegativeInt | str]

    @field_validator("dtype")
    @classmethod
    def numeric(cls, value: str) -> str:
        try:
            kind = np.dtype(value).kind
        except TypeError:
            kind = None
        if kind not in ("f", "i", "u", "b"):
            raise ValueError(f"{value!r} is not a numeric dtype")
        return value


class GraphSpec(BaseModel):
    file: str
    int8_file: str | None = None
    inputs: list[ValueSpec]
    outputs: list[ValueSpec]


class DecodeSpec(BaseModel):
    skip_special_tokens: bool
    clean_up_tokenization_spaces: bool
    strip: bool


class TokensSpec(BaseModel):
    tokenizer: str
    eos_id: int
    prompt_ids: list[int]
    decode: DecodeSpec


RESIZE_MODES = ("squash", "crop", "letterbox")  # prefixcap.images.RESIZE_MODES, without importing torch's side


class ImageSpec(BaseModel):
    size: PositiveInt
    mean: tuple[float, float, float]
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]
    resize: Literal["squash", "crop", "letterbox"]
    crop_pct: PositiveFloat
    # letterbox's padding, RGB in [0, 1], as the export resolved it (the encoder's mean unless the recipe chose one);
    # null for the other modes, and absent from manifests written before letterbox (they never letterbox)
    fill: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)],
                Annotated[float, Field(ge=0, le=1)]] | None = None  # fmt: skip


class GenerateSpec(BaseModel):
    max_new_tokens: PositiveInt
    num_beams: PositiveInt
    do_sample: bool
    repetition_penalty: float


class ExportManifest(BaseModel):
    """What the captioner reads from an export's manifest.json (other fields, a web page's for one, pass)."""

    system: str = ""  # the registered name of the system exported: for people, never read to decide anything
    graphs: dict[str, GraphSpec]
    runtime: Runtime | None = None  # None only in a prefixcap-onnx/1 manifest
    tokens: TokensSpec
    image: ImageSpec
    generate: GenerateSpec
    # language -> the step graph that captions in it (prefixcap.languages); tags only, as they name menu entries
    languages: dict[Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$")], str] = {}


def legacy_runtime(parsed: ExportManifest) -> Runtime:
    """The runtime a prefixcap-onnx/1 export's system implied: prefix, or crossattn (its image graph's outputs, the
    cross-attention keys and values, fed on every step)."""
    if parsed.system == "prefix":
        return Runtime(image=["vision_encoder", "connector"], step="decoder", first_step={"prefix_embeds": 1})
    if parsed.system == "crossattn":
        image = parsed.graphs.get("vision_encoder")
        cross = [value.name for value in image.outputs] if image else []
        return Runtime(image=["vision_encoder"], step="decoder", every_step=cross)
    raise ValueError(f"system: a {LEGACY_FORMAT} export holds a prefix or crossattn system, not {parsed.system!r}")


def read_manifest(directory: Path) -> tuple[dict[str, Any], Runtime]:
    """The export's manifest and its runtime, checked to hold what the captioner reads: an export is a file from
    anyone, and a missing section would otherwise surface as a KeyError in the middle of captioning."""
    manifest = checkpoints.read_manifest(directory, (FORMAT, LEGACY_FORMAT), ExportError, "an exported captioner")
    path = directory / "manifest.json"
    try:
        parsed = ExportManifest.model_validate(manifest)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "manifest"
        raise ExportError(f"{path}: invalid manifest: {where}: {first['msg']}") from None
    if parsed.runtime is None and manifest["format"] == FORMAT:
        raise ExportError(f"{path}: invalid manifest: runtime: Field required")
    try:
        runtime = parsed.runtime or legacy_runtime(parsed)
    except ValueError as e:
        raise ExportError(f"{path}: invalid manifest: {e}") from None
    steps = [runtime.step, *parsed.languages.values()]
    try:
        for step in steps:  # English's step graph, then each language's in its place
            runtime.model_copy(update={"step": step}).check(parsed.model_dump()["graphs"], alternates=steps)
    except ValueError as e:
        raise ExportError(f"{path}: invalid manifest: runtime: {e}") from None
    return manifest, runtime


def file_inside(directory: Path, name: str) -> Path:
    """``directory``/``name``, refused unless it is a file inside ``directory`` (no absolute path, "..", or symlink
    leading out): the manifest, not the user, names it."""
    path = directory / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(directory.resolve()):
        raise ExportError(f"{directory}: {name} named in the manifest is outside the export directory")
    if not path.is_file():
        raise ExportError(f"{directory}: {name} listed in the manifest is missing")
    return path


def open_session(path: Path, graph: dict[str, Any], options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime session for the graph file ``path``, whose inputs and outputs must be those the manifest
    declares (the runtime was checked against the manifest's names)."""
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises types of its own (InvalidProtobuf, Fail, ...) for a damaged graph
        raise ExportError(f"{path}: not a usable ONNX graph: {summary(e)}") from None
    for side, values in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        names = sorted(value.name for value in values)
        if names != sorted(value["name"] for value in graph[side]):
            raise ExportError(f"{path}: the graph's {side} ({', '.join(names)}) are not those the manifest declares")
    return session


def check_resize(resize: str | None) -> str | None:
    if resize is not None and resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    return resize


class OnnxCaptioner:
    def __init__(self, directory: str | Path, *, int8: bool = False, threads: int | None = None,
                 resize: str | None = None, lang: str | None = None):  # fmt: skip
        """``threads``: onnxruntime's intra-op threads per graph (default: one per physical core). ``resize``
        (squash, crop, letterbox): resize images so instead of as the system was trained (the manifest's mode).
        ``lang``: caption in this language (one the export lists; None or "en": the system's own)."""
        self.directory, self.int8 = Path(directory), int8
        self.resize = check_resize(resize)
        self.manifest, self.runtime = read_manifest(self.directory)
        self.lang = None if lang in (None, "en") else lang
        languages = self.manifest.get("languages") or {}  # checked by read_manifest, each language's graph too
        steps = {self.runtime.step, *languages.values()}
        if self.lang is not None:
            if self.lang not in languages:
                raise ExportError(f"{self.directory}: no {self.lang!r} language in this export (it has: "
                                  f"{', '.join(languages) or 'none'}; English is the system's own)")  # fmt: skip
            self.runtime = self.runtime.model_copy(update={"step": languages[self.lang]})
        key = "int8_file" if int8 else "file"
        options = self.session_options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, graph in self.manifest["graphs"].items():
            if name in steps and name != self.runtime.step:  # another language's decoder: not loaded
                continue
            if graph.get(key) is None:
                raise ExportError(f"{self.directory}: no int8 graphs (export with int8=True)")
            self.sessions[name] = open_session(file_inside(self.directory, graph[key]), graph, options)
        self.tokens = self.manifest["tokens"]
        tokenizer = file_inside(self.directory, self.tokens["tokenizer"])
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ExportError(f"{tokenizer}: unreadable tokenizer: {summary(e)}") from None
        step_inputs = [value["name"] for value in self.manifest["graphs"][self.runtime.step]["inputs"]]
        self.cache = self.runtime.cache_names(step_inputs)  # (past input, present output) pairs
        generate = self.manifest["generate"]
        if generate["num_beams"] > 1 or generate["do_sample"] or generate["repetition_penalty"] != 1:
            warnings.warn("the recipe asks for beam search, sampling or a repetition penalty; OnnxCaptioner decodes "
                          "greedily", stacklevel=2)  # fmt: skip

    def caption(self, images: list[Image.Image], max_new_tokens: int | None = None,
                resize: str | None = None) -> list[str]:  # fmt: skip
        """Alt text for RGB PIL images, one caption each; ``resize`` overrides the resize mode for this call."""
        if not images:
            return []
        ids = self.generate(self.pixel_values(images, resize), max_new_tokens)
        decode = self.tokens["decode"]
        texts = self.tokenizer.decode_batch(ids, skip_special_tokens=decode["skip_special_tokens"])
        if decode["clean_up_tokenization_spaces"]:
            for old, new in CLEAN_UPS:
                texts = [t.replace(old, new) for t in texts]
        return [t.strip() for t in texts] if decode["strip"] else texts

    def pixel_values(self, images: list[Image.Image], resize: str | None = None) -> np.ndarray:
        """(B, 3, S, S) float32, as the manifest's preprocessing (prefixcap.images.ImageProcessor) makes them;
        ``resize``: another mode than the manifest's (else the captioner's ``resize``, if given)."""
        return np.stack([self._pixels(image, resize) for image in images])

    def _pixels(self, image: Image.Image, resize: str | None = None) -> np.ndarray:
        spec = self.manifest["image"]
        size = spec["size"]
        mode = check_resize(resize) or getattr(self, "resize", None) or spec["resize"]
        x = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)  # (H, W, 3)
        h, w = x.shape[:2]
        scaled = math.floor(size / spec["crop_pct"])
        if mode == "letterbox":  # longest edge to size, crop_pct ignored (nothing is cut)
            scale = size / max(h, w)
            nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
        elif mode == "squash":
            nh = nw = scaled
        else:  # "crop": shortest edge to size, then the centre
            scale = scaled / min(h, w)
            nh, nw = max(scaled, round(h * scale)), max(scaled, round(w * scale))
        if (nh, nw) != (h, w):
            channels = [Image.fromarray(np.ascontiguousarray(x[..., c])).resize((nw, nh), Image.Resampling.BICUBIC)
                        for c in range(3)]  # fmt: skip
            x = np.stack([np.asarray(c) for c in channels], axis=-1)
        mean, std = np.asarray(spec["mean"], dtype=np.float32), np.asarray(spec["std"], dtype=np.float32)
        if mode == "letterbox":  # centred on the fill colour, the odd pixel of padding below (right)
            fill = spec.get("fill") or spec["mean"]  # an export of another mode records none: the mean, as torch's
            canvas = np.empty((size, size, 3), dtype=np.float32)
            canvas[...] = np.asarray(fill, dtype=np.float32)
            top, left = (size - nh) // 2, (size - nw) // 2
            canvas[top : top + nh, left : left + nw] = np.clip(x, 0, 1)
            return ((canvas - mean) / std).transpose(2, 0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = np.clip(x[top : top + size, left : left + size], 0, 1)
        return ((x - mean) / std).transpose(2, 0, 1)

    def generate(self, pixel_values: np.ndarray, max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy token ids per image, up to and including EOS."""
        limit = max_new_tokens or self.manifest["generate"]["max_new_tokens"]
        eos = self.tokens["eos_id"]
        ids: list[list[int]] = [[] for _ in range(len(pixel_values))]
        done = np.zeros(len(ids), dtype=bool)
        logits, feed = self.start(pixel_values)
        for step in range(limit):
            new = logits.argmax(-1)
            for i in np.flatnonzero(~done):
                ids[i].append(int(new[i]))
            done |= new == eos
            if done.all() or step == limit - 1:
                break
            logits, feed = self.step(feed, new[:, None].astype(np.int64))
        return ids

    def start(self, pixel_values: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The image graphs, then the first step (with the prompt ids): logits (B, V) of the first caption token, and
        what the next step feeds."""
        return self.begin(self.encode(pixel_values), len(pixel_values))

    def encode(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """The image graphs: what the step graph is fed of each image (every_step and first_step inputs, batch
        first). The ONNX scorer encodes an image once and teacher-forces many texts from it (``begin``)."""
        given = {PIXELS: pixel_values}
        for graph in self.runtime.image:
            given.update(self.run(graph, given))
        return {name: given[name] for name in [*self.runtime.every_step, *self.runtime.first_step]}

    def begin(self, encoded: dict[str, np.ndarray], batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The first step from ``encode``'s outputs (``batch`` rows) and an empty cache, fed the prompt ids."""
        runtime, feed = self.runtime, dict(encoded)
        axis = runtime.cache.length_axis
        for value in self.manifest["graphs"][runtime.step]["inputs"]:
            if value["name"] in dict(self.cache):  # an empty past: the batch, length 0, the other dims as declared
                shape = [batch, *(0 if i == axis else d for i, d in enumerate(value["shape"]) if i > 0)]
                feed[value["name"]] = np.zeros(shape, dtype=value["dtype"])
        prompt = np.asarray(self.tokens["prompt_ids"], dtype=np.int64)
        return self.step(feed, np.tile(prompt, (batch, 1)))

    def step(self, feed: dict[str, np.ndarray], input_ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One step: input_ids (B, T) after the cached past -> logits (B, V) and the next step's feed."""
        runtime = self.runtime
        past = feed[self.cache[0][0]].shape[runtime.cache.length_axis]
        first = sum(feed[name].shape[axis] for name, axis in runtime.first_step.items())  # 0 after the first step
        mask = np.ones((len(input_ids), past + first + input_ids.shape[1]), dtype=np.int64)
        outputs = self.run(runtime.step, {**feed, INPUT_IDS: input_ids, ATTENTION_MASK: mask})
        feed = {**feed, **{past_name: outputs[present] for past_name, present in self.cache}}
        for name, axis in runtime.first_step.items():  # in the cache now
            feed[name] = np.take(feed[name], [], axis=axis)
        return outputs[LOGITS], feed

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph on the inputs it takes from ``feed``; outputs by name."""
        session = self.sessions[graph]
        outputs = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
        return {o.name: value for o, value in zip(session.get_outputs(), outputs)}

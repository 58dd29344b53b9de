"""What an ONNX export tells its runtime: the graphs that run once per image, what the step graph is fed and when, how
its cache is named. A system declares it (``System.onnx_export``, built from prefixcap.onnx_parts); prefixcap.export
checks it against the graphs it wrote and puts it in manifest.json as "runtime"; OnnxCaptioner and web/caption.js
follow it without knowing which system wrote it. No torch here: the captioner reads this.

What every export shares, so the runtime section does not repeat it:

- the first image graph takes ``pixel_values`` (batch, 3, S, S) float32, made as the manifest's "image" section says;
  each later one takes ``pixel_values`` or outputs of the graphs before it;
- the step graph takes ``input_ids`` (batch, new tokens) and ``attention_mask`` (batch, past + first-step lengths +
  new tokens), int64, all ones, and returns ``logits`` (batch, vocab) of the last position; the first step's ids are
  the manifest's tokens.prompt_ids, each later one the token chosen last;
- every step input named ``<cache.past><suffix>`` comes back as the output ``<cache.present><suffix>`` with the
  step's positions appended along ``cache.length_axis``; the first step feeds it empty along that axis;
- axis 0 of every input is the batch.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from prefixcap.errors import PrefixcapError

FORMAT = "prefixcap-onnx/2"
LEGACY_FORMAT = "prefixcap-onnx/1"  # before systems declared their runtime: its system name implied one
PIXELS, INPUT_IDS, ATTENTION_MASK, LOGITS = "pixel_values", "input_ids", "attention_mask", "logits"


class ExportError(PrefixcapError):
    """A system cannot be exported, or an export directory is missing, incomplete or of another format."""


class Cache(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    past: str = Field("past_key_values.", min_length=1)  # step inputs whose names start with this are the cache
    present: str = Field("present.", min_length=1)  # ... and come back as outputs named with this instead
    length_axis: PositiveInt = 2  # the axis positions are appended along (2 for transformers' keys and values)


class Runtime(BaseModel):
    """How to caption with an export's graphs, by graph and input name (see the module docstring for what is fixed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: list[str] = Field(min_length=1)  # graphs run once per image, in this order
    step: str  # the graph run once per generated token
    every_step: list[str] = []  # image-graph outputs the step takes on every step (cross-attention keys and values)
    # Image-graph outputs the step takes on the first step only, then empty along the given axis: a prefix, which is
    # in the cache after the first step. Their lengths count in attention_mask.
    first_step: dict[str, PositiveInt] = {}
    cache: Cache = Cache()

    def check(self, graphs: Mapping[str, Mapping[str, Any]], alternates: Collection[str] = ()) -> None:
        """ValueError, saying what is wrong, unless ``graphs`` (name -> {"inputs": [{"name", "shape", ...}],
        "outputs": [...]}, as manifest.json describes them) are wired as this runtime says. ``alternates``: step
        graphs that may stand in for this one (each language's), which are checked with their own runtime."""
        names = [*self.image, self.step]
        if len(set(names)) < len(names):
            raise ValueError(f"a graph is named twice among image {self.image} and step {self.step!r}")
        for name in names:
            if name not in graphs:
                raise ValueError(f"no {name!r} graph among the graphs ({', '.join(graphs) or 'none'})")
        if unused := [name for name in graphs if name not in names and name not in alternates]:
            raise ValueError(f"graph {unused[0]!r} is neither an image graph nor the step graph")
        given = {PIXELS}
        for name in self.image:
            inputs, outputs = values(graphs[name], "inputs"), values(graphs[name], "outputs")
            if missing := [i for i in inputs if i not in given]:
                raise ValueError(f"image graph {name!r} takes {missing[0]!r}, which neither {PIXELS} nor an image "
                                 "graph before it gives")  # fmt: skip
            if again := [o for o in outputs if o in given]:
                raise ValueError(f"image graph {name!r} gives {again[0]!r}, which is already given before it")
            given |= set(outputs)
        step_inputs, step_outputs = values(graphs[self.step], "inputs"), values(graphs[self.step], "outputs")
        fed = [*self.every_step, *self.first_step]
        if len(set(fed)) < len(fed):
            raise ValueError("an input is named in both every_step and first_step")
        for name in fed:
            if name == PIXELS or name not in given:
                raise ValueError(f"{name!r} is fed to the step graph but no image graph gives it")
            if name not in step_inputs:
                raise ValueError(f"{name!r} is fed to the step graph, which takes no such input")
        for name in (INPUT_IDS, ATTENTION_MASK):
            if name not in step_inputs:
                raise ValueError(f"the step graph {self.step!r} takes no {name!r}")
        if LOGITS not in step_outputs:
            raise ValueError(f"the step graph {self.step!r} gives no {LOGITS!r}")
        cache = self.cache_names(step_inputs)
        if not cache:
            raise ValueError(f"the step graph {self.step!r} takes no cache (inputs named {self.cache.past}*)")
        if strays := [i for i in step_inputs if i not in (INPUT_IDS, ATTENTION_MASK, *fed, *dict(cache))]:
            raise ValueError(f"the step graph takes {strays[0]!r}, which the runtime does not say how to feed")
        if lost := [present for _, present in cache if present not in step_outputs]:
            raise ValueError(f"the step graph gives no {lost[0]!r} for its cache input of the same suffix")
        shapes = {v["name"]: v["shape"] for v in graphs[self.step]["inputs"]}
        axis = self.cache.length_axis
        for past, _ in cache:
            shape = shapes[past]
            if len(shape) <= axis:
                raise ValueError(f"cache input {past!r} has no axis {axis} (its shape is {shape})")
            if symbolic := [d for i, d in enumerate(shape) if i not in (0, axis) and not isinstance(d, int)]:
                raise ValueError(f"cache input {past!r} has a dim {symbolic[0]!r} besides the batch and its length: an "
                                 "empty cache could not be made")  # fmt: skip
        for name, axis in self.first_step.items():
            if len(shapes[name]) <= axis:
                raise ValueError(f"first_step input {name!r} has no axis {axis} (its shape is {shapes[name]})")

    def cache_names(self, step_inputs: list[str]) -> list[tuple[str, str]]:
        """(past input, present output) of every cache tensor among the step graph's inputs."""
        other = {INPUT_IDS, ATTENTION_MASK, *self.every_step, *self.first_step}
        past, present = self.cache.past, self.cache.present
        return [(name, present + name.removeprefix(past)) for name in step_inputs
                if name.startswith(past) and name not in other]  # fmt: skip


def values(graph: Mapping[str, Any], side: str) -> list[str]:
    return [value["name"] for value in graph[side]]

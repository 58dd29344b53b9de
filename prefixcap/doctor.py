"""`prefixcap doctor RECIPE`: is everything the recipe reads from disk on this machine, and how to get what is not.

Every component declares what it reads through its options model's ``needs()`` (prefixcap.checkpoints.Need): a hub
model or data set, a local path, an installed package, or nothing at all (``tiny``, a bundled model, generated data).
A plugin's components take part the same way, through the same method. The CLIPScore model that ``eval.clip_model``
picks is one more need. Each is looked up where its loader will look (huggingface_hub's cache for hub ids), nothing
is loaded or downloaded, and every missing one comes with the command that gets it and the recipe line naming it.

`prefixcap run` and `prefixcap bench` make the same check before they create anything (``preflight``). Offline
(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set) nothing can be downloaded later, so a missing hub model or data set stops
them there, all listed in one error; online they would download it when they load it, so it is only reported (the
WillDownload event). A local path or package that is missing stops them either way: no download would bring it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixcap.checkpoints import (BUNDLED, Found, Need, hub_cache, hub_dataset_found, hub_model_found, offline_setting,
                                   package_found, path_exists)  # fmt: skip
from prefixcap.errors import PluginError, PrefixcapError, summary
from prefixcap.recipe import Loc, Recipe, load_recipe
from prefixcap.registry import get_component

HUB_KINDS = ("hub-model", "hub-dataset")  # what a run that can reach the hub downloads itself


class NotOnDisk(PrefixcapError):
    """A recipe needs models or data that are not on this machine and will not be downloaded."""


@dataclass(frozen=True)
class Item:
    """One need of one recipe: where the recipe names it, and whether it is on disk."""

    where: str  # file:line, `--set KEY`, a file without a line; "" for a recipe given as a dict (no file to name)
    option: str  # the recipe key naming it: encoder.checkpoint, data.path, eval.clip_model, system.decoder
    component: str  # "encoder 'siglip'", "CLIPScore"
    need: Need
    found: Found

    @property
    def status(self) -> str:
        return self.found.status

    def describe(self) -> str:
        """``where: option 'name': detail`` in one line (the error's line and the report's)."""
        return f"{self.where + ': ' if self.where else ''}{self.option} {self.need.name!r}: {self.found.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"where": self.where, "option": self.option, "component": self.component, "kind": self.need.kind,
                "name": self.need.name, "status": self.status, "detail": self.found.detail,
                "fix": self.found.fix or None}  # fmt: skip


@dataclass
class Checkup:
    """What a recipe (or several, for bench) needs, each looked up."""

    recipe: str  # its file or name; "" for a dict
    items: list[Item]
    offline: str | None = field(default_factory=offline_setting)  # the variable keeping the hub libraries offline

    @property
    def missing(self) -> list[Item]:
        return [i for i in self.items if i.status == "missing"]

    def blocking(self) -> list[Item]:
        """What a run cannot get by itself: every missing thing offline; online, those no download brings."""
        return [i for i in self.missing if self.offline or i.need.kind not in HUB_KINDS]

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe or None, "offline": self.offline, "hub_cache": str(hub_cache()),
                "missing": len(self.missing), "items": [i.as_dict() for i in self.items]}  # fmt: skip

    def error(self) -> str:
        """The message of the error a run stops with: every missing thing on its own line, with its fix."""
        blocking = self.blocking()
        count = f"{len(blocking)} thing{'s' * (len(blocking) != 1)} it needs {'are' if len(blocking) != 1 else 'is'}"
        why = (f"{self.offline} is set, so nothing will be downloaded" if self.offline
               else f"no download would bring {'them' if len(blocking) != 1 else 'it'}")  # fmt: skip
        lines = [f"{self.recipe + ': ' if self.recipe else ''}{count} not on this machine ({why}; Hugging Face cache: "
                 f"{hub_cache()}):"]  # fmt: skip
        for item in blocking:
            line = item.describe() + (f"; get it with: {item.found.fix}" if item.found.fix else "")
            if item.component == "CLIPScore":  # unlike the others, a run can do without it
                line += "; eval.clip_model picks the CLIPScore model: set it to null to skip CLIPScore"
            lines.append(line)
        again = self.recipe if self.recipe and "," not in self.recipe else "RECIPE"
        lines.append(f"(`prefixcap doctor {again}` checks again; nothing was created)")
        return "\n".join(lines)


@dataclass(frozen=True)
class WillDownload:
    """Reported by run and bench, online, before they start: hub models or data sets not yet in the cache, which
    their loaders will download."""

    items: tuple[Item, ...]


def _where(recipe: Recipe, loc: Loc) -> str:
    where = recipe.location(loc)
    return "" if where == "<dict>" else where  # a recipe given as a dict has no file or line to point at


def find(need: Need) -> Found:
    """Look ``need`` up where its loader will look, loading and downloading nothing."""
    if need.kind == "hub-model":
        return hub_model_found(need.name, need.files, need.download, need.revision)
    if need.kind == "hub-dataset":
        return hub_dataset_found(need.name, need.revision)
    if need.kind == "path":
        if path_exists(need.name):
            return Found("present", f"on disk ({Path(need.name).expanduser().absolute()})")
        return Found("missing", f"no such file or directory ({Path(need.name).absolute()})")
    if need.kind == "package":
        return package_found(need.module or need.name, need.pattern or "*", need.install)
    if need.kind == "bundled":
        path = BUNDLED.get(need.name)
        if path is not None and path.is_dir():
            return Found("present", f"bundled with prefixcap ({path})")
        return Found("missing", "bundled with prefixcap, but missing from this installation: reinstall prefixcap",
                     "pip install --force-reinstall prefixcap")  # fmt: skip
    if need.kind == "nothing":
        return Found("present", need.note or "nothing to load")
    return Found("unchecked", need.note or "read by the component its own way: not checked")


def _component_items(recipe: Recipe) -> Iterable[Item]:
    for loc, kind, spec in recipe.components():
        section = ".".join(map(str, loc))
        component = f"{kind} {spec.name!r}"
        try:
            needs = list(spec.options.needs())
            if not all(isinstance(n, Need) for n in needs):
                raise TypeError("it must return a list of prefixcap.checkpoints.Need")
        except Exception as e:  # a plugin's own method may raise anything; the others are still worth checking
            unknown = Need("unchecked", spec.name, "", note=f"its needs() failed: {summary(e)}")
            yield Item(_where(recipe, loc), section, component, unknown, find(unknown))
            continue
        for need in needs:
            option = loc + tuple(str(need.option).split(".")) if need.option else loc
            yield Item(_where(recipe, option), ".".join(map(str, option)), component, need, _find(need))


def _find(need: Need) -> Found:
    try:
        return find(need)
    except Exception as e:  # a plugin's Need naming something no lookup can take (an invalid repository id)
        return Found("unchecked", f"could not be looked up: {summary(e)}")


def _scorer_item(recipe: Recipe) -> Item | None:
    """The CLIPScore model a run loads before it trains (eval.clip_model; `auto` asks the data for its own)."""
    from prefixcap.metrics.clipscore import choose_clip_model, scorer_needs

    setting = recipe.eval.clip_model
    data_default = None
    if recipe.data is not None:
        try:
            data_default = getattr(get_component("dataset", recipe.data.name).load_factory(), "clip_model", None)
        except PluginError:
            data_default = None  # a data set that cannot be imported: the run says so, with its own error
    name = choose_clip_model(setting, data_default if isinstance(data_default, str) else None)
    if name is None:
        return None
    # `auto` is not written anywhere: the data section decides it, so that is the line to point at
    written = "clip_model" in recipe.eval.model_fields_set
    loc: Loc = ("eval", "clip_model") if written or recipe.data is None else ("data",)
    needs = scorer_needs(name)
    option = "eval.clip_model" + ("" if setting != "auto" else " (auto)")
    return next((Item(_where(recipe, loc), option, "CLIPScore", n, _find(n)) for n in needs), None)


def check(recipe: Any, overrides: tuple[str, ...] | list[str] = ()) -> Checkup:
    """Everything ``recipe`` (a path, name, dict or Recipe) reads from disk, each looked up."""
    recipe = load_recipe(recipe, overrides)
    items = list(_component_items(recipe))
    scorer = _scorer_item(recipe)
    items += [scorer] if scorer is not None else []
    return Checkup("" if recipe.source == "<dict>" else recipe.source, items)


def preflight(checkups: list[Checkup], report: Callable[[Any], None] | None = None,
              error: type[PrefixcapError] = NotOnDisk) -> None:  # fmt: skip
    """Stop before anything is created when a recipe needs what is not on disk and will not be downloaded (one
    ``error``, every missing thing listed: run raises its RunError, bench its BenchError); else report what the
    run's loaders will download."""
    # bench checks every entry: one list, each thing once, where it is first named (entries share their data)
    first: dict[Need, Item] = {}
    for item in (i for c in checkups for i in c.items):
        first.setdefault(item.need, item)
    merged = Checkup(", ".join(dict.fromkeys(c.recipe for c in checkups if c.recipe)), list(first.values()))
    if merged.blocking():
        raise error(merged.error())
    if merged.missing and report is not None:
        report(WillDownload(tuple(merged.missing)))

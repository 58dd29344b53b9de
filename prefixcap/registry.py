"""Plugin loading and the component registry.

A registration is data: kind, name, description, the pydantic options model, and a lazy ``"module:factory"`` path.
Listing components imports plugin modules but never the factories, so it never imports torch. Built-in components
are loaded exactly like third-party ones: from the ``prefixcap`` entry-point group, prefixcap's own distribution
first (so on a name clash the builtin is the one already there when the clash is found).

``PREFIXCAP_LOAD_PLUGINS`` limits which third-party distributions are loaded: unset loads every installed plugin,
an empty string loads builtins only, ``"a,b"`` loads builtins plus distributions a and b (a name that is not an
installed plugin distribution is reported as broken, with the close matches).

A plugin that fails never stops the others: an import or a hook that raises (SystemExit included), an invalid
registration, a hook name prefixcap does not have, a module with no ``@hookimpl``, or a name already registered is
recorded in ``Registry.broken``. Each hook call is a transaction: what a call registered before it raised is withdrawn,
so a half-registered plugin never looks usable until build time.
A builtin keeps its name: a third-party plugin registering the same kind and name is the broken one. Two third-party
plugins registering the same name make it ambiguous until one is uninstalled or left out by PREFIXCAP_LOAD_PLUGINS.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import inspect
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefixcap import hookspecs
from prefixcap.checkpoints import Need, checkpoint_needs
from prefixcap.errors import PluginError, UnknownComponentError, first_line
from prefixcap.yaml_text import short

ENTRY_POINT_GROUP = "prefixcap"
SELF_DIST = "prefixcap"
KINDS = ("encoder", "connector", "decoder", "loss", "system", "dataset")
HOOKS = {kind: f"register_{kind}{'es' if kind.endswith('s') else 's'}" for kind in KINDS}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class ComponentOptions(BaseModel):
    """Base of every component's options model: the recipe's ``{name, **options}`` minus ``name``.

    Subclass it and add fields; unknown keys are rejected so a typo in a recipe is an error, not a silent default.
    A component that loads weights subclasses CheckpointOptions instead.
    """

    # inf and nan are never a sensible rate, size or weight (a plugin model may set allow_inf_nan=True)
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)

    def needs(self) -> list[Need]:
        """What these options make the component read from disk (weights, data, a package holding them), for
        `prefixcap doctor` and the check `prefixcap run` makes before it starts; see prefixcap.checkpoints.Need.
        Override it when an option names such a thing; it must not load anything, only say where to look."""
        return []


class CheckpointOptions(ComponentOptions):
    """Options of a component that loads weights: ``checkpoint`` names them (a subclass may give it a default, or
    make it required); other components refuse a ``checkpoint:`` key like any unknown option."""

    checkpoint: str | None = Field(None, description="where the weights come from: a hub id, a local directory, or "
                                   "`tiny` (a small random model of the same class)")  # fmt: skip

    def needs(self) -> list[Need]:
        # Read as transformers reads it (tiny, bundled, a local path, or a hub id whose cache must hold config.json
        # and safetensors weights); a component that reads its checkpoint another way overrides this.
        return checkpoint_needs(self.checkpoint)


@dataclass(frozen=True)
class Provider:
    """Who registered a component: a distribution, its version, and the entry point (plugin module) inside it."""

    dist: str
    version: str
    plugin: str

    def __str__(self) -> str:
        return f"{self.dist} {self.version}"


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    factory: str
    options: type[ComponentOptions]
    description: str
    provider: Provider

    def parse_options(self, raw: dict[str, Any] | ComponentOptions | None) -> ComponentOptions:
        if isinstance(raw, self.options):
            return raw
        if isinstance(raw, BaseModel):
            raw = raw.model_dump(exclude_unset=True)
        return self.options.model_validate(raw or {})

    def load_factory(self) -> Callable[..., Any]:
        module_name, _, attr = self.factory.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except Exception as e:  # the plugin's own import may raise anything
            raise PluginError(
                f"{self.kind} {self.name!r} from {self.provider}: cannot import {self.factory}: "
                f"{type(e).__name__}: {e}"
            ) from e


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that failed to import, whose hook raised, or that registered something invalid or clashing."""

    provider: Provider
    error: str
    # The kinds whose components it may have failed to provide: None when that is unknown (its import failed), so an
    # unknown name of any kind points at it; () when it cannot explain a missing name (a clash: the name exists).
    kinds: tuple[str, ...] | None = None

    @property
    def origin(self) -> str:
        """``dist version (plugin entry point)``, or the bare name PREFIXCAP_LOAD_PLUGINS gave."""
        p = self.provider
        return " ".join(filter(None, (p.dist, p.version))) + (f" (plugin {p.plugin})" if p.plugin else "")


@dataclass
class Registry:
    components: dict[tuple[str, str], Registration] = field(default_factory=dict)
    clashes: dict[tuple[str, str], list[Provider]] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)
    plugin_manager: pluggy.PluginManager | None = None

    def get(self, kind: str, name: str) -> Registration:
        _check_kind(kind)
        if (kind, name) in self.clashes:
            names = " and ".join(str(p) for p in self.clashes[(kind, name)])
            raise PluginError(
                f"{kind} {name!r} is registered by both {names}; uninstall one, or choose the plugins to load "
                f"with PREFIXCAP_LOAD_PLUGINS"
            )
        try:
            return self.components[(kind, name)]
        except KeyError:
            known = sorted(n for k, n in self.components if k == kind)
            suspects = [f"{b.origin}: {b.error}" for b in self.broken if b.kinds is None or kind in b.kinds]
            raise UnknownComponentError(kind, name, difflib.get_close_matches(name, known, n=3, cutoff=0.5), known,
                                        suspects) from None  # fmt: skip

    def list(self, kind: str | None = None, pattern: str | None = None) -> list[Registration]:
        if kind is not None:
            _check_kind(kind)
        rows = [
            r
            for r in self.components.values()
            if (kind is None or r.kind == kind) and (pattern is None or re.search(pattern, r.name))
        ]
        return sorted(rows, key=lambda r: (KINDS.index(r.kind), r.name))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")


def _normalise(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _wanted_dists() -> set[str] | None:
    """Third-party distributions allowed by PREFIXCAP_LOAD_PLUGINS; None means all of them."""
    raw = os.environ.get("PREFIXCAP_LOAD_PLUGINS")
    if raw is None:
        return None
    return {_normalise(d.strip()) for d in raw.split(",") if d.strip()}


def _plugin_entry_points(reg: Registry | None = None) -> list[tuple[Provider, metadata.EntryPoint]]:
    """Entry points of the allowed distributions; with ``reg``, names in PREFIXCAP_LOAD_PLUGINS that match no
    installed plugin distribution are recorded there as broken (a typo would otherwise load nothing, silently)."""
    wanted = _wanted_dists()
    seen: set[str] = set()
    plugin_dists: dict[str, str] = {}
    found: list[tuple[Provider, metadata.EntryPoint]] = []
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        key = _normalise(name)
        if key in seen:  # the same distribution twice on sys.path: the first one wins, as in importlib
            continue
        seen.add(key)
        eps = list(dist.entry_points.select(group=ENTRY_POINT_GROUP))
        if eps and key != SELF_DIST:
            plugin_dists[key] = name
        if key != SELF_DIST and wanted is not None and key not in wanted:
            continue
        for ep in eps:
            found.append((Provider(name, dist.version, ep.name), ep))
    if reg is not None and wanted:
        for key in sorted(wanted - set(plugin_dists) - {SELF_DIST}):
            close = difflib.get_close_matches(key, list(plugin_dists), n=3, cutoff=0.8)
            what = "is installed but has no prefixcap plugins" if key in seen else "is not installed"
            hint = f"; did you mean {', '.join(plugin_dists[c] for c in close)}?" if close else ""
            known = ", ".join(sorted(plugin_dists.values())) or "none"
            reg.broken.append(BrokenPlugin(Provider(key, "", ""), f"PREFIXCAP_LOAD_PLUGINS names {key!r}, which "
                                           f"{what}{hint} (installed plugin distributions: {known})"))  # fmt: skip
    # Builtins first, then third parties in a stable order: a clash is then always reported on the newcomer.
    found.sort(key=lambda pe: (_normalise(pe[0].dist) != SELF_DIST, _normalise(pe[0].dist), pe[0].plugin))
    return found


def _short_error(e: BaseException) -> str:
    """One line, at most ~300 characters, whatever the plugin raised (its message may be long, or multi-line), with
    the plugin's own line that raised it (not register()'s, when register refused what the plugin gave it)."""
    frame = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__][-1:]
    where = f" ({os.path.basename(frame[0].filename)}:{frame[0].lineno})" if frame else ""
    try:
        message = " ".join(str(e).split())
    except Exception:  # an exception whose __str__ raises
        message = "(no message)"
    message = message if len(message) <= 300 else message[:297] + "..."
    return f"{type(e).__name__}: {message}{where}"


def load_registry() -> Registry:
    """Load every allowed plugin and collect its registrations. Failures are recorded, never raised."""
    reg = Registry()
    pm = pluggy.PluginManager("prefixcap")
    pm.add_hookspecs(hookspecs)
    reg.plugin_manager = pm
    providers: dict[str, Provider] = {}

    for provider, ep in _plugin_entry_points(reg):
        plugin_name = f"{provider.dist}:{provider.plugin}"
        try:
            module = ep.load()
            pm.register(module, name=plugin_name)
        except (Exception, SystemExit) as e:  # a plugin calling sys.exit() at import must not end the command
            reg.broken.append(BrokenPlugin(provider, f"cannot load {ep.value}: {_short_error(e)}"))
            continue
        providers[plugin_name] = provider
        problem = _hook_problem(module, ep.value, bool(pm.get_hookcallers(module)))
        if problem is not None:
            reg.broken.append(BrokenPlugin(provider, *problem))

    for kind in KINDS:
        hook = getattr(pm.hook, HOOKS[kind])
        for impl in hook.get_hookimpls():
            provider = providers[impl.plugin_name]
            made, error = _call_hook(impl, kind, provider)
            if error is None:
                for registration in made:
                    _add(reg, registration)
                continue
            if made:
                error += f"; so what it registered is withdrawn ({', '.join(f'{r.kind} {r.name!r}' for r in made)})"
            reg.broken.append(BrokenPlugin(provider, error, (kind,)))
    return reg


_HOOK_HOW = "mark each hook function with @hookimpl (`from prefixcap import hookimpl`)"


def _hook_problem(module: Any, where: str, has_hooks: bool) -> tuple[str, tuple[str, ...] | None] | None:
    """Why a plugin module would silently register nothing, or less than it means to, with the kinds affected: a hook
    name prefixcap does not have (pluggy ignores it), a hook function without @hookimpl, or no hook at all."""
    impl, spec = "prefixcap_impl", "prefixcap_spec"  # the attributes pluggy's markers set
    hooks = list(HOOKS.values())
    unknown = sorted(n for n in dir(module) if hasattr(getattr(module, n, None), impl) and n not in hooks)
    if unknown:  # e.g. register_decoder for register_decoders
        kinds = {k for n in unknown for k, h in HOOKS.items() if h in difflib.get_close_matches(n, hooks, 1)}
        return (f"{where} implements {', '.join(unknown)}, which prefixcap does not call (its hooks: "
                f"{', '.join(hooks)})", tuple(sorted(kinds, key=KINDS.index)) or None)  # fmt: skip
    defined = {k: getattr(module, h, None) for k, h in HOOKS.items()}
    # a function named like a hook without the marker; one imported from hookspecs (a spec) is no forgotten hook
    unmarked = [k for k, f in defined.items() if inspect.isfunction(f) and not any(hasattr(f, m) for m in (impl, spec))]
    if unmarked:
        names = ", ".join(HOOKS[k] for k in unmarked)
        return f"{where} defines {names} without @hookimpl, so prefixcap never calls it; {_HOOK_HOW}", tuple(unmarked)
    if not has_hooks:
        return (f"{where} implements none of prefixcap's hooks ({', '.join(hooks)}), so it registers "
                f"nothing; {_HOOK_HOW}", None)  # fmt: skip
    return None


def _call_hook(impl: Any, kind: str, provider: Provider) -> tuple[list[Registration], str | None]:
    """Call one plugin's hook, one plugin at a time so that a hook that raises only breaks its own plugin: what it
    registered, and None or the error that withdraws all of it (a registration refused counts even if the hook
    caught the error, and so does a hook that registered nothing but returned something: async, a generator)."""
    made: list[Registration] = []
    refused: list[str] = []

    def register(name, factory, options=ComponentOptions, description=""):
        try:
            made.append(_registration(kind, name, factory, options, description, provider))
        except PluginError as e:
            refused.append(str(e))
            raise

    try:
        result = impl.function(*[{"register": register}[a] for a in impl.argnames])
    except (Exception, SystemExit) as e:
        return made, f"{HOOKS[kind]} failed: {_short_error(e)}"
    if refused:
        return made, f"{HOOKS[kind]} failed: PluginError: {refused[0]}"
    if result is not None and not made:
        if inspect.iscoroutine(result) or inspect.isgenerator(result):
            result.close()  # never run: closed, so Python does not warn that it was never awaited
        return made, (f"{HOOKS[kind]} returned a {type(result).__name__} and registered nothing; a hook is a plain "
                      "function (not async, no yield) that calls register(...) once per component")
    return made, None


def _registration(kind, name, factory, options, description, provider: Provider) -> Registration:
    """What a plugin's register(...) call gave, checked: a bad name, factory or options model is refused at once."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(f"invalid {kind} name {short(name)}: use lowercase letters, digits, '.', '_' or '-'")
    if not isinstance(factory, str) or ":" not in factory:
        raise PluginError(f"{kind} {name!r}: factory must be a 'module:attribute' string, got {short(factory)}")
    if not (isinstance(options, type) and issubclass(options, ComponentOptions)):
        raise PluginError(f"{kind} {name!r}: options must subclass prefixcap.ComponentOptions, got {short(options)}")
    if description is not None and not isinstance(description, str):
        raise PluginError(f"{kind} {name!r}: description must be a string, got {short(description)}")
    return Registration(kind, name, factory, options, first_line(description or ""), provider)


def _add(reg: Registry, registration: Registration) -> None:
    kind, name, provider = registration.kind, registration.name, registration.provider
    key = (kind, name)
    builtin = reg.components.get(key)
    if builtin is not None and _normalise(builtin.provider.dist) == SELF_DIST:  # a plugin cannot take a builtin's name
        clash = f"{kind} {name!r} clashes with the builtin one (prefixcap {builtin.provider.version}), which stays"
        clash += "; rename it"
        reg.broken.append(BrokenPlugin(provider, clash, ()))
        return
    if key in reg.components or key in reg.clashes:
        first = reg.components.pop(key, None)
        owners = reg.clashes.setdefault(key, [first.provider] if first else [])
        owners.append(provider)
        reg.broken.append(
            BrokenPlugin(provider, f"{kind} {name!r} clashes with the one registered by {owners[0]}", ())
        )
        return
    reg.components[key] = registration


_REGISTRY: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded on first use (idempotent)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def reload_registry() -> Registry:
    """Forget loaded plugins and load them again (after installing one, or changing PREFIXCAP_LOAD_PLUGINS)."""
    global _REGISTRY
    _REGISTRY = None
    return registry()


def list_components(kind: str | None = None, pattern: str | None = None) -> list[Registration]:
    """Registered components, optionally of one kind and/or whose name matches a regex. Never imports torch."""
    return registry().list(kind, pattern)


def get_component(kind: str, name: str) -> Registration:
    return registry().get(kind, name)


def create(kind: str, name: str, options: dict[str, Any] | ComponentOptions | None = None, **wiring: Any) -> Any:
    """Build one component by kind and name; ``options`` are validated by the component's own options model."""
    registration = get_component(kind, name)
    try:
        opts = registration.parse_options(options)
    except ValidationError as e:
        raise PluginError(f"{kind} {name!r}: invalid options: {e}") from e
    return with_spec(registration.load_factory()(opts, **wiring), name, opts)


# A distribution name (PEP 508) and a version as a manifest may record them; anything else is not repeated to the user
_DIST_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,39}$")


def why_unregistered(kind: str, name: str, dist: Any = None, version: Any = None) -> str | None:
    """None if ``kind`` ``name`` is registered; else why not, for a component that distribution ``dist`` ``version``
    provided (as a saved system's manifest records it), and what to do: it is not installed, it failed to load,
    PREFIXCAP_LOAD_PLUGINS leaves it out, or the version installed no longer registers the name. ``dist`` and
    ``version`` come from a stranger's file: they are only repeated when they look like a name and a version."""
    reg = registry()
    try:
        reg.get(kind, name)
        return None
    except UnknownComponentError as e:
        unknown = e
    except PluginError as e:  # two plugins register it
        return f"its {kind} {short(name)}: {e}"
    if not (isinstance(dist, str) and _DIST_RE.match(dist)):
        return str(unknown)
    version = version if isinstance(version, str) and _VERSION_RE.match(version) else None
    origin = f"its {kind} {short(name)} came from {dist}" + (f" {version}" if version else "")
    pinned = f"'{dist}=={version}'" if version else dist
    key = _normalise(dist)
    if key == SELF_DIST:
        return (f"{origin}, and this prefixcap ({metadata.version(SELF_DIST)}) has no {kind} of that name: pip install "
                f"{pinned}")  # fmt: skip
    try:
        installed = metadata.distribution(dist).version
    except metadata.PackageNotFoundError:
        return f"{origin}, which is not installed: pip install {dist}"
    failed = [b.error for b in reg.broken if _normalise(b.provider.dist) == key]
    if failed:
        return f"{origin}, which failed to load: {'; '.join(failed)}"
    wanted = _wanted_dists()
    if wanted is not None and key not in wanted:
        return (f"{origin}, which is installed but not loaded: PREFIXCAP_LOAD_PLUGINS leaves it out; add {dist} to it "
                "(or unset it to load every installed plugin)")  # fmt: skip
    return f"{origin}, but the {dist} installed ({installed}) registers none of that name: pip install {pinned}"


SPEC_ATTRIBUTE = "component_spec"


def with_spec(built: Any, name: str, options: ComponentOptions) -> Any:
    """Mark ``built`` with the recipe section that builds it again ({name, **options}): compose() given built parts
    writes their sections into the system's recipe, so the system saves a manifest that load() can rebuild."""
    try:
        setattr(built, SPEC_ATTRIBUTE, {"name": name, **options.model_dump(mode="json")})
    except (AttributeError, TypeError):  # a factory may return an object that takes no attributes; it stays unmarked
        pass
    return built


def built_spec(built: Any) -> dict[str, Any] | None:
    """The recipe section ``built`` was made from (see with_spec); None for a part built by hand."""
    spec = getattr(built, SPEC_ATTRIBUTE, None)
    return dict(spec) if isinstance(spec, dict) else None

"""Domain errors. Each carries the message a user should read; the CLI prints it and exits with code 2."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class PrefixcapError(Exception):
    """Base of every error prefixcap reports to users (CLI: one line, exit code 2, no traceback)."""


class RecipeError(PrefixcapError):
    """A recipe (YAML file, dict or --set override) is invalid."""


class PluginError(PrefixcapError):
    """A plugin failed to load, registered something invalid, or clashes with another plugin."""


class UnknownComponentError(PluginError):
    """No component of that kind and name is registered."""

    def __init__(self, kind: str, name: str, suggestions: list[str], known: list[str], broken: Sequence[str] = ()):
        """``broken``: the plugins that failed to load and may have provided the name, each "origin: error"."""
        self.kind, self.name, self.suggestions, self.known = kind, name, suggestions, known
        self.broken = list(broken)
        hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        listing = ", ".join(known) if known else "none registered"
        # The broken plugins before the listing: a plugin that failed to load is a likelier story than a typo, and a
        # recipe error is cut to one line of 400 characters, which keeps its start.
        maybe = ""
        if broken:
            which = "a plugin" if len(broken) == 1 else f"one of {len(broken)} plugins"
            maybe = f"{' Or' if hint else ';'} it may come from {which} that failed to load (see `prefixcap plugins`): "
            maybe += "; ".join(broken)
        super().__init__(f"unknown {kind} {name!r}{hint}{maybe} (registered {kind}s: {listing})")


class CompositionError(PrefixcapError):
    """Components were found but do not fit together (dimensions, LoRA targets, missing parts)."""


class SavedSystemError(PrefixcapError):
    """A saved system is missing, incomplete or does not match what its manifest describes."""


class ImageError(PrefixcapError):
    """An input could not be read or converted to an RGB image; ``reason`` says why without naming the file, for
    reports that show the path in a column of its own."""

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason, self.path = reason, path
        super().__init__(reason if path is None else f"{path}: {reason}")


def first_line(text: str) -> str:
    """The first line of ``text`` (stripped), or "": one-line messages from multi-line library errors and docs."""
    text = text.strip()
    return text.splitlines()[0] if text else ""


def summary(error: BaseException) -> str:
    """A library exception in one line, for wrapping it in a message the user can act on."""
    return first_line(str(error)) or type(error).__name__

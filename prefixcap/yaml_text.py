"""Safe YAML with the line of every key, and the text helpers that keep error messages short and printable.

Used by recipes and anything else that reports a user's YAML or values back to them; it imports only
prefixcap.errors.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

from prefixcap.errors import RecipeError, summary

Loc = tuple[str | int, ...]
MAX_YAML_NODES = 100_000  # an alias bomb expands past this long before it costs memory
MAX_DEPTH = 100  # a recipe nests 4 levels deep; far deeper is a mistake or an attack (or an alias to itself)
_MAX_LINE = 400  # longest line of an error message: long keys and values are shortened, never printed whole


class TooBig(RecipeError):
    """A document past the node or depth limit: refused outright, never read as a plain string by --set."""


def parse_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML safely; also return the 1-based line of every mapping key / sequence item.

    Whatever the text, the outcome is data or a RecipeError: PyYAML's own errors, the plain exceptions its
    constructors raise on bad tagged scalars (``!!int x``, a 5000-digit integer), nesting deeper than Python's
    stack, self-referencing aliases and alias bombs."""
    loader = None
    try:
        loader = _Loader(text)  # checks every character first
        node = loader.get_single_node()
        lines: dict[Loc, int] = {}
        if node is not None:
            _index_lines(node, (), lines, [0])
        data = loader.construct_document(node) if node is not None else None
    except TooBig as e:
        raise TooBig(f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RecipeError(one_line(f"{where}: invalid YAML: {e.problem or e.context or summary(e)}")) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, most control characters)
        line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else None
        where = f"{source}:{line}" if line else source
        raise RecipeError(one_line(f"{where}: invalid YAML: character #x{e.character:04x}: {e.reason}")) from None
    except RecursionError:
        raise TooBig(f"{source}: invalid YAML: nested deeper than {MAX_DEPTH} levels") from None
    except Exception as e:  # yaml.YAMLError, or ValueError/KeyError/... from a constructor given a bad scalar
        raise RecipeError(one_line(f"{source}: invalid YAML: {summary(e)}")) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


class _Loader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """The composer recurses once per level: refuse deep nesting before Python's stack runs out (a
        RecursionError is caught too, but unwinding a thousand frames takes a second)."""
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise TooBig(f"invalid YAML: nested deeper than {MAX_DEPTH} levels (at line {line})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """SafeLoader's, but a scalar its constructor cannot read (``!!int x``, ``!!bool maybe``, an integer of
        5000 digits) is a YAML error at the scalar's line, not a bare ValueError or KeyError."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, IndexError) as e:
            what = short(node.value) if isinstance(node, yaml.ScalarNode) else f"this {type(node).__name__}"
            tag = str(node.tag).rsplit(":", 1)[-1]
            problem = f"cannot read {what} as {tag}: {type(e).__name__}: {summary(e)}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _index_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int], count: list[int]) -> None:
    count[0] += 1
    if count[0] > MAX_YAML_NODES:
        raise TooBig(f"recipe is too large or expands without bound (over {MAX_YAML_NODES} YAML nodes)")
    if len(loc) > MAX_DEPTH:  # also what an alias to an enclosing node (`a: &a [*a]`) looks like
        raise TooBig(f"recipe nests deeper than {MAX_DEPTH} levels, or an alias refers to itself "
                     f"(at line {node.start_mark.line + 1})")  # fmt: skip
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            # a complex key (a list or mapping) is refused when constructed; never render it (it may be a bomb)
            child = loc + (str(key.value) if isinstance(key, yaml.ScalarNode) else "?",)
            lines[child] = key.start_mark.line + 1
            _index_lines(value, child, lines, count)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, loc + (i,), lines, count)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200  # cut before repr() sees all of a long value (or an expanded alias bomb)


def short(value: Any, limit: int = 60, quote: bool = True) -> str:
    """``value`` for an error message: its repr (or, ``quote=False``, a string as is), on one line, at most
    ``limit`` characters, and cheap whatever its size."""
    if quote or not isinstance(value, str):
        try:
            value = _REPR.repr(value)
        except Exception:  # e.g. an int too long to print, or an object whose __repr__ fails
            value = f"<{type(value).__name__}>"
    text = printable(value[: limit * 4])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """Control characters, line breaks and lone surrogates escaped (\\x1b, \\n, \\ud800): safe on any terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def dotted(loc: Loc) -> str:
    """A recipe location as dotted keys, each one shortened and printable."""
    return ".".join(short(part if isinstance(part, (str, int)) else short(part), 60, quote=False) for part in loc)


def one_line(text: str) -> str:
    """One line of an error message: printable, and at most _MAX_LINE characters."""
    return short(text, _MAX_LINE, quote=False)

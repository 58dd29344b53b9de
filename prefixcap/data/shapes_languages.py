"""The shapes world in German, French and Russian: each language's words, inflection, templates and oracle.

English lives in prefixcap.data.shapes; the languages here were chosen for grammar English lacks: German adjectives
agree in gender and case ("ein roter Kreis", "ein rotes Quadrat", "links von einem roten Kreis"), French colours
follow the noun ("un petit cercle rouge"), and Russian, in Cyrillic, has case endings ("слева от красного круга").
Each is a ``Grammar``: a function that writes a shape's noun phrase in a grammatical case, and templates that place
the phrases of a scene, in the cases their words govern, as ``{nom[0]}`` (shape 0, left most, in the nominative) or
``{dat[1]}`` (shape 1 in the dative).

The oracle is exact both ways by construction:
- a noun phrase is any of the surfaces the phrase function writes, every shape in every case a template uses, and
  nothing else: a wrong gender ("ein rotes Kreis"), a wrong case ("слева от красный круг") or an English word ("ein
  roter circle") is no noun phrase, so its words stay in the skeleton and the caption is none of the grammar's.
  Each surface names one shape in one case (checked when a grammar is built).
- each phrase is replaced by its case's mark (``<nom>``, ``<dat>``, ...) and what is left, the skeleton, must be one
  of the forms word for word. The forms are the templates' own skeletons, plus a few wordings the oracle reads but
  the generator does not write (``also``); the order each form gives is read off the shape numbers of its template,
  so every reference parses back to its scene, and no two forms share a skeleton (checked when built).

Text is normalised before it is read: Unicode NFC, case folded (``casefold``: "Groß" reads as "gross"), Russian ё
read as е (references write ё), and anything but a letter or digit of any script becomes a space.

This module does not import prefixcap.data.shapes (which imports it): a shape here is the plain triple (colour,
kind, size), as the ``Shape`` named tuple of prefixcap.data.shapes is, and that module turns parsed triples into
Shapes. Its words (English, the oracle's canonical names) are the same as there; a test checks it.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

LANGUAGES = ("en", "de", "fr", "ru")

Triple = tuple[str, str, str | None]  # (colour, kind, size), as prefixcap.data.shapes.Shape
_COLOURS, _KINDS, _SIZES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle"), ("small", "large")
_SLOT = re.compile(r"\{(\w+)\[(\d)\]\}")  # a template's "{case[shape number]}"


class Grammar:
    """One language of the shapes world: what it writes for a scene (``references``) and how it reads a caption back
    (``phrases``), as described in the module docstring."""

    def __init__(self, code: str, phrase: Callable[[Triple, str], str], templates: Mapping[int, Sequence[str]],
                 nouns: Sequence[str], also: Sequence[str] = (), fold: Mapping[str, str] | None = None):  # fmt: skip
        self.code, self.phrase, self.templates = code, phrase, {n: tuple(t) for n, t in templates.items()}
        self._fold = str.maketrans(dict(fold or {}))
        self.cases = tuple(dict.fromkeys(m[1] for t in (*itertools.chain(*self.templates.values()), *also)
                                         for m in _SLOT.finditer(t)))  # fmt: skip
        self.surfaces: dict[str, tuple[str, Triple]] = {}  # normalised noun phrase -> (its case, its shape)
        for colour, kind, size in itertools.product(_COLOURS, _KINDS, (None, *_SIZES)):
            for case in self.cases:
                surface = self.normalise(phrase((colour, kind, size), case))
                if surface in self.surfaces:
                    raise ValueError(f"{code}: {surface!r} names {self.surfaces[surface]} and {(case, colour, kind)}")
                self.surfaces[surface] = (case, (colour, kind, size))
        # Longest first, though matches are of whole words, so that a phrase is never read as a shorter one.
        alternatives = "|".join(map(re.escape, sorted(self.surfaces, key=len, reverse=True)))
        self._noun_phrase = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
        self.forms: dict[str, tuple[int, ...]] = {}  # skeleton -> which phrase is 1st, 2nd, ... from the left
        for template in (*itertools.chain(*self.templates.values()), *also):
            skeleton, order = self._skeleton(template)
            if self.forms.setdefault(skeleton, order) != order:
                raise ValueError(f"{code}: {template!r} has the skeleton of another form with another order")
        self.nouns = frozenset(self.normalise(noun) for noun in nouns)  # every form of "circle", "square", ...

    def normalise(self, text: str) -> str:
        folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold()).translate(self._fold)
        return " ".join(re.sub(r"[^\w]+", " ", folded).split())

    def _skeleton(self, template: str) -> tuple[str, tuple[int, ...]]:
        pieces = _SLOT.split(template)  # text, case, number, text, case, number, ..., text
        words = [self.normalise(pieces[0])]
        named = []
        for k in range(1, len(pieces), 3):
            words += [f"<{pieces[k]}>", self.normalise(pieces[k + 2])]
            named.append(int(pieces[k + 1]))
        if sorted(named) != list(range(len(named))):
            raise ValueError(f"{self.code}: {template!r} must name each shape of its scene once")
        return " ".join(w for w in words if w), tuple(named.index(p) for p in range(len(named)))

    def references(self, scene: Sequence[Triple]) -> list[str]:
        """Every caption this language writes for ``scene``, the plainest first."""
        if len(scene) not in self.templates:
            raise ValueError(f"a scene has 1 to 3 shapes, not {len(scene)}")
        phrases = {case: [self.phrase(tuple(shape), case) for shape in scene] for case in self.cases}
        return [template.format(**phrases) for template in self.templates[len(scene)]]

    def phrases(self, text: str) -> tuple[list[Triple], tuple[int, ...]] | None:
        """The caption's noun phrases as (colour, kind, size) in the order it names them, and which of them is 1st,
        2nd, ... from the left; None if the caption is none of this grammar's."""
        shapes: list[Triple] = []

        def take(match: re.Match[str]) -> str:
            case, shape = self.surfaces[match[0]]
            shapes.append(shape)
            return f"<{case}>"

        order = self.forms.get(self._noun_phrase.sub(take, self.normalise(text)))
        return None if order is None else (shapes, order)

    def glossary(self) -> dict[str, str]:
        """Each word of this language's noun phrases that names one colour, kind or size, with that English word
        ("roter": "red", "Dreieck": "triangle", "маленького": "small"). A word is glossed with the one attribute every
        shape whose phrases use it shares ("Kreis": circle; "ein", used by every shape, is not glossed); where it
        shares two, as "roter" (only red circles), one the phrase names with another word (Kreis) is not its own."""
        phrases = [(tuple(self.phrase(shape, case).split()), {a for a in shape if a})
                   for shape in itertools.product(_COLOURS, _KINDS, (None, *_SIZES)) for case in self.cases]  # fmt: skip
        shared: dict[str, set[str]] = {}
        for words, attributes in phrases:
            for word in words:
                shared[word] = shared[word] & attributes if word in shared else set(attributes)
        pure = {word: next(iter(values)) for word, values in shared.items() if len(values) == 1}
        glossary = dict(pure)
        for word, values in shared.items():
            if len(values) > 1:
                own = {v for v in values if not all(any(pure.get(other) == v for other in words if other != word)
                                                    for words, _ in phrases if word in words)}  # fmt: skip
                if len(own) == 1:
                    glossary[word] = own.pop()
        return glossary

    def is_noun(self, word: str) -> bool:
        """Whether a caption's word (punctuation and all) is a shape noun, in any case."""
        return self.normalise(word).replace(" ", "") in self.nouns


# --- German: gender (Kreis m, Quadrat n, Dreieck n) and case (dative after "von" and "neben") ----------------------

_DE_NOUNS = {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n")}
_DE_STEMS = {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "small": "klein", "large": "groß"}
# After the indefinite article the adjective takes the mixed declension: the article and the adjectives' ending by
# case and gender (the dative noun of these three has no ending of its own).
_DE_ARTICLE = {"nom": {"m": "ein", "n": "ein"}, "dat": {"m": "einem", "n": "einem"}}
_DE_ENDING = {"nom": {"m": "er", "n": "es"}, "dat": {"m": "en", "n": "en"}}


def _german(shape: Triple, case: str) -> str:
    colour, kind, size = shape
    noun, gender = _DE_NOUNS[kind]
    adjectives = [_DE_STEMS[word] + _DE_ENDING[case][gender] for word in (size, colour) if word]
    return " ".join([_DE_ARTICLE[case][gender], *adjectives, noun])


GERMAN = Grammar(
    "de", _german, nouns=[noun for noun, _ in _DE_NOUNS.values()],
    templates={
        1: ["{nom[0]}", "nur {nom[0]}", "genau {nom[0]}"],
        2: ["{nom[0]} links von {dat[1]}",
            "{nom[1]} rechts neben {dat[0]}",
            "links {nom[0]} und rechts {nom[1]}",
            "{nom[0]} und {nom[1]} von links nach rechts",
            "von links nach rechts: {nom[0]} und {nom[1]}"],
        3: ["von links nach rechts: {nom[0]}, {nom[1]} und {nom[2]}",
            "{nom[0]}, {nom[1]} und {nom[2]} von links nach rechts",
            "links {nom[0]}, in der Mitte {nom[1]} und rechts {nom[2]}"],
    },
    also=["{nom[0]} links neben {dat[1]}", "{nom[1]} rechts von {dat[0]}", "{nom[0]} links und {nom[1]} rechts"],
)  # fmt: skip


# --- French: colours after the noun, sizes before it; all three nouns are masculine --------------------------------

_FR_NOUNS = {"circle": "cercle", "square": "carré", "triangle": "triangle"}
_FR_WORDS = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "small": "petit", "large": "grand"}


def _french(shape: Triple, case: str) -> str:
    # One case: French marks the complement with a preposition, written in the template ("à gauche d'un ...").
    colour, kind, size = shape
    size_word = [_FR_WORDS[size]] if size else []
    return " ".join(["un", *size_word, _FR_NOUNS[kind], _FR_WORDS[colour]])


FRENCH = Grammar(
    "fr", _french, nouns=list(_FR_NOUNS.values()),
    templates={
        1: ["{nom[0]}", "seulement {nom[0]}", "il y a {nom[0]}"],
        2: ["{nom[0]} à gauche d'{nom[1]}",
            "{nom[1]} à droite d'{nom[0]}",
            "{nom[0]} à gauche et {nom[1]} à droite",
            "{nom[0]} et {nom[1]}, de gauche à droite",
            "de gauche à droite : {nom[0]} et {nom[1]}"],
        3: ["de gauche à droite : {nom[0]}, {nom[1]} et {nom[2]}",
            "{nom[0]}, {nom[1]} et {nom[2]}, de gauche à droite",
            "{nom[0]} à gauche, {nom[1]} au milieu et {nom[2]} à droite"],
    },
    also=["à gauche {nom[0]} et à droite {nom[1]}", "à gauche {nom[0]}, au milieu {nom[1]} et à droite {nom[2]}"],
)  # fmt: skip


# --- Russian: Cyrillic, no articles, case endings (genitive after "от"); all three nouns are masculine -------------

_RU_WORDS = {  # (nominative, genitive), masculine singular
    "circle": ("круг", "круга"), "square": ("квадрат", "квадрата"), "triangle": ("треугольник", "треугольника"),
    "red": ("красный", "красного"), "green": ("зелёный", "зелёного"), "blue": ("синий", "синего"),
    "yellow": ("жёлтый", "жёлтого"), "small": ("маленький", "маленького"), "large": ("большой", "большого"),
}  # fmt: skip
_RU_CASES = ("nom", "gen")


def _russian(shape: Triple, case: str) -> str:
    colour, kind, size = shape
    return " ".join(_RU_WORDS[word][_RU_CASES.index(case)] for word in (size, colour, kind) if word)


RUSSIAN = Grammar(
    "ru", _russian, nouns=[form for kind in _KINDS for form in _RU_WORDS[kind]], fold={"ё": "е"},
    templates={
        1: ["{nom[0]}", "один {nom[0]}", "только один {nom[0]}"],  # "один": masculine, as every noun here
        2: ["{nom[0]} слева от {gen[1]}",
            "{nom[1]} справа от {gen[0]}",
            "слева {nom[0]}, а справа {nom[1]}",
            "{nom[0]} и {nom[1]} слева направо",
            "слева направо: {nom[0]} и {nom[1]}"],
        3: ["слева направо: {nom[0]}, {nom[1]} и {nom[2]}",
            "{nom[0]}, {nom[1]} и {nom[2]} слева направо",
            "слева {nom[0]}, в центре {nom[1]}, а справа {nom[2]}"],
    },
    also=["{nom[0]} левее {gen[1]}", "{nom[1]} правее {gen[0]}", "слева {nom[0]}, справа {nom[1]}",
          "слева {nom[0]}, в центре {nom[1]}, справа {nom[2]}"],
)  # fmt: skip

GRAMMARS = {grammar.code: grammar for grammar in (GERMAN, FRENCH, RUSSIAN)}


def grammar(language: str) -> Grammar | None:
    """The grammar of ``language``; None for English, whose oracle is prefixcap.data.shapes' own."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; the shapes world speaks {', '.join(LANGUAGES)}")
    return GRAMMARS.get(language)

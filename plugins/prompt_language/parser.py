"""The AUTOMATIC1111 prompt language, parsed the way A1111 (v1.6 to v1.10.1) parses it. Pure Python, no torch.

A positive prompt goes through these steps, in A1111's order (see `docs/prompt-language.md`):

1. `extract_extra_networks`: `<name:arg:...>` tags are cut out (punctuation around them stays).
2. `split_and`: the text is split on `AND`; a trailing `:number` on each piece is that piece's weight.
3. `prompt_schedules`: `[from:to:when]`, `[to:when]`, `[from::when]` and `[a|b|c]` give each piece a
   per-step schedule of plain strings, as `(until, text)` pairs.
4. `parse_prompt_attention`: every scheduled string is split into `(text, weight)` runs by the emphasis
   syntax `(a)`, `[a]`, `(a:1.3)`, with `BREAK` as the run `("BREAK", -1.0)`.

`parse_prompt` runs all four and returns a JSON-ready dict; `parse_negative_prompt` does the same for a
negative prompt, which A1111 neither splits on AND nor strips of tags.

The results (texts, step numbers and float weights, multiplied in A1111's order so that `((a))` weighs
1.2100000000000002) are A1111's, with the deviations below. Every public function takes `strict`
(default True). `strict=False` turns off the checks that exist only to refuse prompts A1111 would
silently misread, and then gives A1111's output for those prompts too (for deviation 11, the one of
A1111's readings that keeps every construct). Prompts on which A1111 itself fails raise `PromptError` in
both modes, since A1111 has no result for them.

A1111 parses editing with lark (Earley parser); this module has a hand-written recursive-descent parser
plus a model of how lark resolves the grammar's ambiguities, checked against lark 1.1.2 on thousands of
random prompts under many hash seeds.

Deviations from A1111
---------------------
Each one raises `sdcore.errors.PromptError` whose `position` is the 0-based offset of the problem in the
text given to the function (`parse_prompt` maps it back to the prompt as written, tags included).

Where A1111 fails with an exception (raised with `strict=False` too):

1. An emphasis weight that is not a number, such as `(a:1.2.3)`, `(a:1..2)` or `(a:.)`. A1111 aborts the
   generation with a ValueError. Position: the first character of the weight.
2. An editing step so large that it overflows, such as `[a:b:1e999]`. A1111 fails with an OverflowError.
   Position: the first character of the number.
3. Brackets (with closing brackets) nested more than 200 levels deep. A1111's lark fails with a
   RecursionError at about 250 levels. Position: the bracket that goes past the limit.

Where A1111 silently loses syntax the user wrote (raised only with `strict=True`):

4. A `|` outside a valid `[a|b]` alternation, or a lone backslash at the very end or before a line
   break, makes A1111's editing grammar fail, and A1111 then ignores every `[from:to:when]` and `[a|b]`
   in the prompt. This is an error when the prompt has such a construct that would be lost, or when the
   `|` sits inside a `[` that is not a valid alternation (`[a|b:5]`, `[(a:b:c)|d]`). Position: the `|`
   or backslash. A `|` in a prompt with no editing or alternation (`{red|blue} dress`) keeps A1111's
   reading: plain text.
5. `BREAK` inside emphasis brackets, as in `(a BREAK b)` or an unclosed `(a BREAK b`. A1111 multiplies
   the marker's weight, no longer recognises it, and encodes the word "BREAK" with a negative weight.
   Position: the `B` of BREAK.
6. `AND` inside a bracket pair, as in `(a AND b)` or `[a AND b:5]`. A1111 splits on AND regardless of
   brackets, which breaks the pair: the emphasis or editing is lost and the closing bracket becomes
   text. Position: the `A` of AND. An unclosed `(` before AND keeps A1111's reading.
7. An extra-network tag inside a `[from:to:when]` or `[a|b]` construct, as in `[<lora:a:1>|<lora:b:1>]`.
   A1111 removes tags before scheduling, so the network applies for the whole run. Position: the `<`.
8. An unclosed tag: `<name:` (name starting with a letter or `_`) with no `>` anywhere after it. A1111
   keeps it as text and does not load the network; a trailing `:0.8` then even becomes the AND weight of
   the prompt. Position: the `<`.
9. A tag whose arguments contain another `<name:`, as in `<lora:a:0.8, <lora:b:1>`. A1111 reads it as one
   tag with arguments `["a", "0.8, <lora", "b", "1"]`. Position: the outer `<`.
10. An extra-network tag in a negative prompt (`parse_negative_prompt`). A1111 does not apply networks
    from negative prompts; it encodes the tag as text. Position: the `<`.
11. An editing or alternation construct that lark can also read as plain text. This happens when it is
    followed, directly or with only other bracket groups in between, by a bracket or colon that is
    plain text: `[cat:dog:0.5]]`, `[a:b:5])`, `[a:b:5]:`, `[a:b:5](unclosed`, `[a:b:5](c)]`. lark
    breaks the tie by Python's string hash order, which is randomised per process, so the same A1111
    install reads the prompt one way or the other from one restart to the next. Position: the
    construct's `[`; the message names the stray character.
"""

from __future__ import annotations

import numbers
import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sdcore.errors import InvalidRequest, PromptError

__all__ = [
    "MAX_NESTING",
    "extract_extra_networks",
    "parse_negative_prompt",
    "parse_prompt",
    "parse_prompt_attention",
    "prompt_schedules",
    "split_and",
    "split_network_args",
]

MAX_NESTING = 200
"""Deepest bracket nesting the editing parser accepts (deviation 3)."""


class _Problem(Exception):
    """A syntax problem found while parsing one text; `to_error` turns it into a `PromptError`.

    `template` is formatted with `pos` and `fields`; fields whose name ends in `_pos` are positions and
    are mapped to the caller's coordinates like `pos`.
    """

    def __init__(self, template: str, pos: int, **fields: Any):
        super().__init__(template)
        self.template = template
        self.pos = pos
        self.fields = fields

    def to_error(self, where: Callable[[int], int] = lambda i: i) -> PromptError:
        fields = {k: where(v) if k.endswith("_pos") else v for k, v in self.fields.items()}
        pos = where(self.pos)
        return PromptError(self.template.format(pos=pos, **fields), pos)


# ---------------------------------------------------------------------------------------------------
# Emphasis: parse_prompt_attention
# ---------------------------------------------------------------------------------------------------

_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1  # A1111 multiplies by this constant; it never divides by 1.1
_ESCAPABLE = "()[]\\"
_CLOSING_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")  # ":1.2)"; digits and dots only, so 1e2 is text
_TEXT_RUN = re.compile(r"[^\\()\[\]:]+")
_BREAK = re.compile(r"\s*\b(BREAK)\b\s*")


def _attention(text: str, strict: bool) -> list[tuple[str, float]]:
    """The emphasis parser; raises `_Problem` with positions in `text`."""
    runs: list[list[Any]] = []  # [text, weight]
    markers: list[tuple[int, int]] = []  # (index in runs, position of the B of BREAK)
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    def add_text(piece: str, at: int) -> None:
        # A text token is split at every BREAK; each split leaves its (possibly empty) neighbours as runs.
        last = 0
        for m in _BREAK.finditer(piece):
            runs.append([piece[last : m.start()], 1.0])
            markers.append((len(runs), at + m.start(1)))
            runs.append(["BREAK", -1.0])
            last = m.end()
        runs.append([piece[last:], 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in _ESCAPABLE:  # \( \) \[ \] \\ give the character itself
                runs.append([text[i + 1], 1.0])
                i += 2
            else:  # any other backslash vanishes, leaving an empty run behind
                runs.append(["", 1.0])
                i += 1
        elif c == "(":
            open_round.append(len(runs))
            i += 1
        elif c == "[":
            open_square.append(len(runs))
            i += 1
        elif c == ":" and (m := _CLOSING_WEIGHT.match(text, i)):
            if open_round:
                try:
                    weight = float(m.group(1))
                except ValueError:
                    raise _Problem(
                        "Invalid emphasis weight {number!r} at position {pos}: A1111 fails on this prompt "
                        "(it cannot convert the weight to a number). Write a number such as 1.2.",
                        m.start(1),
                        number=m.group(1),
                    ) from None
                scale(open_round.pop(), weight)
            else:  # no "(" to close: the whole ":1.2)" is text
                add_text(m.group(0), i)
            i = m.end()
        elif c == ")" and open_round:
            scale(open_round.pop(), _ROUND_MULTIPLIER)
            i += 1
        elif c == "]" and open_square:
            scale(open_square.pop(), _SQUARE_MULTIPLIER)
            i += 1
        else:
            end = i + 1 if c in "):]" else _TEXT_RUN.match(text, i).end()  # type: ignore[union-attr]
            add_text(text[i:end], i)
            i = end

    # Groups left open are closed at the end: all round ones (outermost first), then all square ones.
    for start in open_round:
        scale(start, _ROUND_MULTIPLIER)
    for start in open_square:
        scale(start, _SQUARE_MULTIPLIER)

    if strict:
        for index, pos in markers:
            weight = runs[index][1]
            if weight != -1.0:
                raise _Problem(
                    "BREAK at position {pos} is inside ( ) or [ ] brackets, so A1111 would not treat it as "
                    "a chunk break: it would encode the word BREAK with weight {weight!r}. "
                    "Move BREAK outside the brackets.",
                    pos,
                    weight=weight,
                )

    if not runs:
        return [("", 1.0)]
    merged = [runs[0]]
    for run in runs[1:]:  # neighbours with exactly equal weights become one run
        if merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged]


def parse_prompt_attention(text: str, *, strict: bool = True) -> list[tuple[str, float]]:
    """Split `text` into `(text, weight)` runs by A1111's emphasis syntax.

    - `(a)` multiplies by 1.1, `[a]` by 1/1.1, `(a:1.3)` by 1.3; nesting multiplies without rounding, so
      `((a))` is 1.2100000000000002 and `([a])` exactly 1.0.
    - `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters; any other backslash disappears.
    - Unclosed groups apply to the rest of the text; stray closers are text. A `:` that does not end a
      weight is text, and so is a weight such as `1e2`.
    - `BREAK` (uppercase, whole word) becomes the run `("BREAK", -1.0)`, swallowing whitespace around it.
    - Neighbouring runs with exactly equal weights are merged; an empty text gives `[("", 1.0)]`.

    Raises `PromptError` for a weight A1111 cannot convert (`(a:1.2.3)`), and with `strict` for BREAK
    inside brackets, where A1111 silently stops treating it as a chunk break.
    """
    try:
        return _attention(text, strict)
    except _Problem as problem:
        raise problem.to_error() from None


# ---------------------------------------------------------------------------------------------------
# Extra-network tags
# ---------------------------------------------------------------------------------------------------

_TAG = re.compile(r"<(\w+):([^>]+)>")
_TAG_START = re.compile(r"<\w+:")
_NAMED_TAG_START = re.compile(r"<[^\W\d]\w*:")


@dataclass(frozen=True)
class _Extracted:
    text: str
    networks: dict[str, list[list[str]]]
    tags: list[tuple[int, int, int]]  # (point in `text` where the tag was, start and end in the input)

    def to_input(self, k: int) -> int:
        """Map an offset in the text without tags to the offset in the input."""
        moved = k
        for point, start, end in self.tags:
            if point > k:
                break
            moved += end - start
        return moved


def _extract(text: str, strict: bool) -> _Extracted:
    networks: dict[str, list[list[str]]] = {}
    tags: list[tuple[int, int, int]] = []
    pieces: list[str] = []
    last = 0
    removed = 0
    for m in _TAG.finditer(text):
        if strict and (inner := _TAG_START.search(m.group(2))):
            raise _Problem(
                "Extra-network tag at position {pos} runs into another tag at position {inner_pos} "
                "(a '>' is missing): A1111 would read both as one tag with garbled arguments.",
                m.start(),
                inner_pos=m.start(2) + inner.start(),
            )
        networks.setdefault(m.group(1), []).append(m.group(2).split(":"))
        pieces.append(text[last : m.start()])
        tags.append((m.start() - removed, m.start(), m.end()))
        removed += m.end() - m.start()
        last = m.end()
    pieces.append(text[last:])
    stripped = "".join(pieces)
    if strict:
        rest = stripped
        for m in _NAMED_TAG_START.finditer(rest):
            if ">" not in rest[m.end() :]:
                at = _Extracted(stripped, networks, tags).to_input(m.start())
                raise _Problem(
                    "Extra-network tag at position {pos} is not closed with '>': A1111 would keep it as "
                    "plain text and not load the network.",
                    at,
                )
    return _Extracted(stripped, networks, tags)


def extract_extra_networks(text: str, *, strict: bool = True) -> tuple[str, dict[str, list[list[str]]]]:
    """Cut `<name:arg:arg...>` tags out of `text` as A1111 does; return the text and the args per name.

    The name is word characters (case-sensitive); the arguments are everything up to the next `>`, split
    on every `:`. Punctuation around a tag stays: `"a, <lora:x:1>, b"` gives `"a, , b"` and
    `{"lora": [["x", "1"]]}`. Names appear in order of first use, arguments in prompt order.

    With `strict`, an unclosed tag and a tag that runs into the next one raise `PromptError`.
    """
    try:
        extracted = _extract(text, strict)
    except _Problem as problem:
        raise problem.to_error() from None
    return extracted.text, extracted.networks


def split_network_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split a tag's arguments into positional and named ones, as A1111's `ExtraNetworkParams` does.

    An argument with exactly one `=` is named (`"te=0.5"` gives `{"te": "0.5"}`); every other argument is
    positional. `["name", "0.8", "unet=1"]` gives `(["name", "0.8"], {"unet": "1"})`.
    """
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in args:
        parts = arg.split("=")
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(arg)
    return positional, named


# ---------------------------------------------------------------------------------------------------
# AND (composable diffusion)
# ---------------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_PIECE_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*\Z", re.S)


def _bracket_pairs(text: str) -> list[tuple[int, int]]:
    """(open, close) positions of the emphasis bracket pairs of `text`, matched as the emphasis parser does."""
    pairs = []
    open_round: list[int] = []
    open_square: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2 if i + 1 < n and text[i + 1] in _ESCAPABLE else 1
            continue
        if c == "(":
            open_round.append(i)
        elif c == "[":
            open_square.append(i)
        elif c == ":" and open_round and (m := _CLOSING_WEIGHT.match(text, i)):
            pairs.append((open_round.pop(), m.end() - 1))
            i = m.end()
            continue
        elif c == ")" and open_round:
            pairs.append((open_round.pop(), i))
        elif c == "]" and open_square:
            pairs.append((open_square.pop(), i))
        i += 1
    return pairs


def _split(text: str, strict: bool) -> list[tuple[int, str, float]]:
    """(start offset, text, weight) of each AND piece."""
    if strict:
        ands = [m.start() for m in _AND.finditer(text)]
        if ands:
            for open_pos, close_pos in sorted(_bracket_pairs(text)):
                inside = [a for a in ands if open_pos < a < close_pos]
                if inside:
                    raise _Problem(
                        "AND at position {pos} is inside the bracket opened at position {open_pos}: A1111 "
                        "splits on AND regardless of brackets, which would break that bracket pair. Close "
                        "the bracket before AND, or write 'and' if you meant the word.",
                        inside[0],
                        open_pos=open_pos,
                    )
    pieces = []
    start = 0
    for piece in _AND.split(text):
        m = _PIECE_WEIGHT.match(piece)
        assert m is not None  # the pattern matches every string
        weight = float(m.group(2)) if m.group(2) is not None else 1.0
        pieces.append((start, m.group(1), weight))
        start += len(piece) + 3
    return pieces


def split_and(prompt: str, *, strict: bool = True) -> list[tuple[str, float]]:
    """Split a positive prompt into `(text, weight)` sub-prompts as A1111's `get_multicond_prompt_list`.

    The separator is the uppercase word `AND` (word boundaries on both sides, brackets ignored). Each
    piece loses its trailing whitespace, keeps its leading whitespace, and a trailing `:number` (sign,
    digits, at most one dot, no exponent) becomes its weight, 1.0 otherwise. This applies without AND
    too: `"score: 9"` is `[("score", 9.0)]`.

    With `strict`, an AND inside a bracket pair raises `PromptError`.
    """
    try:
        return [(text, weight) for _, text, weight in _split(prompt, strict)]
    except _Problem as problem:
        raise problem.to_error() from None


# ---------------------------------------------------------------------------------------------------
# Prompt editing and alternation: prompt_schedules
# ---------------------------------------------------------------------------------------------------

# lark's SIGNED_NUMBER, tried as lark's lexer tries it: one greedy match, never a shorter one.
_NUMBER = re.compile(
    r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)"
)
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class _Edit:
    """`[before:after:when]`; `before` is None for `[after:when]`. `start`/`end` span the brackets."""

    start: int
    end: int
    before: tuple[_Item, ...] | None
    after: tuple[_Item, ...]
    number: str
    number_pos: int


@dataclass(frozen=True)
class _Alternation:
    start: int
    end: int
    options: tuple[tuple[_Item, ...], ...]


_Item = tuple[int, int] | _Edit | _Alternation  # a (start, end) range of literal text, or a construct


class _NoParse(Exception):
    """The text at this position is not a valid construct."""


class _EditingParser:
    """Recursive descent over A1111's editing grammar, choosing what lark's Earley parser chooses.

    Inside a construct everything must be well formed: brackets balance, `:` and `|` appear only where
    the grammar puts them, so a construct starting at a given offset has at most one parse (memoised).
    At the top level a `(`, `[`, `)`, `]` or `:` that does not start a valid construct is plain text.
    A `[` that does start one is usually read as that construct, but lark may also read it as plain text
    when stray brackets stand next to it; `readings` works out what lark does there.
    """

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[tuple[_Item, ...], int] | None] = {}
        self.kinds: set[int] = set()  # offsets of the valid editing and alternation constructs
        self.closed = self._closers()

    def top(self, active: frozenset[int] | None = None) -> tuple[tuple[_Item, ...], list[int], list[int]]:
        """Parse the whole text: the items, the offsets that make A1111's grammar fail, and the offsets of
        the brackets and colons left as plain text.

        With `active`, only the editing and alternation constructs starting at those offsets are read as
        constructs (one of lark's readings, see `readings`); otherwise every valid construct is.
        """
        s, n = self.text, len(self.text)
        items: list[_Item] = []
        failures: list[int] = []
        literals: list[int] = []
        i = literal = 0
        while i < n:
            c = s[i]
            if c in "([":
                try:
                    inner, end = self.construct(i, 1)
                except _NoParse:
                    inner = None
                if inner is not None and (active is None or (i in active and i in self.kinds)):
                    _add_range(items, literal, i)
                    _extend(items, inner)
                    i = literal = end
                    continue
                if inner is None:
                    literals.append(i)
            elif c in ")]:":
                literals.append(i)
            elif c == "|":
                failures.append(i)
            elif c == "\\":
                if i + 1 < n and s[i + 1] != "\n":
                    i += 2
                    continue
                failures.append(i)
            i += 1
        _add_range(items, literal, n)
        return tuple(items), failures, literals

    def readings(self, limit: int = 2) -> list[frozenset[int]]:
        """The sets of editing/alternation constructs (by start offset) that lark may pick as active.

        A1111's lark parser (Earley, ambiguity="resolve") reads the top level as a sequence of `prompt`s
        and runs of literal `[]():` characters. Where several segmentations exist it prefers, at each
        end position working leftwards: the whole prefix as one prompt; else the whole prefix as one
        literal run; else any split whose last piece is a prompt; else any split whose last piece is a
        literal run. Ties among splits are broken by Python's hash order, which changes from one process
        to the next, so more than one result means A1111 is not deterministic on this prompt. At most
        `limit` different sets are returned. Call only when `top()` found no failures.
        """
        s, n = self.text, len(self.text)
        special = [False] * n
        i = 0
        while i < n:
            if s[i] == "\\":
                i += 2
                continue
            special[i] = s[i] in "[]():|"
            i += 1
        # Token edges ending at each offset: prompt elements (plain text pieces, valid constructs)
        elements: dict[int, list[int]] = {}
        i = 0
        while i < n:
            if special[i]:
                i += 1
                continue
            start = i
            while i < n and not special[i]:
                i += 1
            ws_end = _SPACE.match(s, start).end()  # type: ignore[union-attr]
            elements.setdefault(i, []).append(start)
            if start < ws_end < i:  # lark's lexer also yields the leading whitespace as its own token
                elements[i].append(ws_end)
                elements.setdefault(ws_end, []).append(start)
        constructs: list[tuple[int, int]] = []
        for p in range(n):
            if special[p] and s[p] in "([":
                try:
                    _, end = self.construct(p, 1)
                except _NoParse:
                    continue
                elements.setdefault(end, []).append(p)
                if p in self.kinds:
                    constructs.append((p, end))

        constructs.sort()
        starts = [p for p, _ in constructs]

        def inside(k: int, e: int) -> frozenset[int]:
            found = set()
            for index in range(bisect_left(starts, k), bisect_left(starts, e)):
                if constructs[index][1] <= e:
                    found.add(constructs[index][0])
            return frozenset(found)

        def merge(into: list[frozenset[int]], more: list[frozenset[int]], add: frozenset[int]) -> None:
            for reading in more:
                reading = reading | add
                if reading not in into and len(into) < limit:
                    into.append(reading)

        # One pass from left to right over end offsets e, for the prefix s[:e]:
        #   ok[e]     it can be parsed at all;
        #   whole[e]  the constructs, if it is a single prompt (None otherwise);
        #   split[e]  lark's readings when it ends with a prompt that starts after 0;
        #   run[e]    lark's readings when it ends with a run of literal characters;
        #   result[e] lark's readings of s[:e] (at most `limit` of them).
        plus = [special[i] and s[i] != "|" for i in range(n)]
        ok = [True] + [False] * n
        whole: list[frozenset[int] | None] = [frozenset()] + [None] * n
        split: list[list[frozenset[int]]] = [[] for _ in range(n + 1)]
        run: list[list[frozenset[int]]] = [[] for _ in range(n + 1)]
        result: list[list[frozenset[int]]] = [[frozenset()]] + [[] for _ in range(n)]
        all_plus = True
        for e in range(1, n + 1):
            all_plus = all_plus and plus[e - 1]
            for k in elements.get(e, ()):
                add = inside(k, e)
                if whole[k] is not None:
                    whole[e] = whole[k] | add  # type: ignore[operator]
                if k:
                    merge(split[e], result[k], add)
                merge(split[e], split[k], add)
                ok[e] = ok[e] or ok[k]
            if plus[e - 1]:
                merge(run[e], result[e - 1], frozenset())
                merge(run[e], run[e - 1], frozenset())
                ok[e] = ok[e] or ok[e - 1]
            if not ok[e]:
                continue
            if whole[e] is not None:  # lark prefers the whole prefix as one prompt,
                result[e] = [whole[e]]  # type: ignore[list-item]
            elif all_plus:  # then as one run of literal characters,
                result[e] = [frozenset()]
            else:  # then any split ending with a prompt, then any split ending with a literal run
                result[e] = split[e] or run[e]
        return result[n]

    def sequence(self, i: int, depth: int) -> tuple[tuple[_Item, ...], int]:
        """The grammar's `prompt`: text and constructs up to the next `)`, `]`, `:`, `|` or the end."""
        s, n = self.text, len(self.text)
        items: list[_Item] = []
        literal = i
        while i < n:
            c = s[i]
            if c in ")]:|":
                break
            if c == "\\":
                if i + 1 < n and s[i + 1] != "\n":
                    i += 2
                    continue
                raise _NoParse
            if c in "([":
                inner, end = self.construct(i, depth + 1)
                _add_range(items, literal, i)
                _extend(items, inner)
                i = literal = end
                continue
            i += 1
        _add_range(items, literal, i)
        return tuple(items), i

    def _closers(self) -> list[bool]:
        """Whether each `(`/`[` has some closing bracket after it: a cheap test that spares unclosed
        brackets (plain text in A1111) the recursive descent and its depth limit."""
        s, n = self.text, len(self.text)
        closed = [False] * n
        stack: list[int] = []
        i = 0
        while i < n:
            c = s[i]
            if c == "\\":
                i += 1
            elif c in "([":
                stack.append(i)
            elif c in ")]" and stack:
                closed[stack.pop()] = True
            i += 1
        return closed

    def construct(self, i: int, depth: int) -> tuple[tuple[_Item, ...], int]:
        if not self.closed[i]:
            raise _NoParse
        if depth > MAX_NESTING:
            raise _Problem(
                "Brackets at position {pos} are nested more than {limit} levels deep.", i, limit=MAX_NESTING
            )
        if i in self.memo:
            found = self.memo[i]
            if found is None:
                raise _NoParse
            return found
        try:
            result = self._construct(i, depth)
        except _NoParse:
            self.memo[i] = None
            raise
        self.memo[i] = result
        if isinstance(result[0][0], (_Edit, _Alternation)):
            self.kinds.add(i)
        return result

    def _construct(self, i: int, depth: int) -> tuple[tuple[_Item, ...], int]:
        s, n = self.text, len(self.text)
        first, j = self.sequence(i + 1, depth)
        if j >= n:
            raise _NoParse
        if s[i] == "(":  # emphasis (a) or (a:b); kept verbatim apart from constructs inside
            if s[j] == ")":
                return _join(i, first, j), j + 1
            if s[j] == ":":
                second, k = self.sequence(j + 1, depth)
                if k < n and s[k] == ")":
                    return _join(i, first, j, second, k), k + 1
            raise _NoParse
        if s[j] == "]":  # emphasis [a]
            return _join(i, first, j), j + 1
        if s[j] == "|":
            options = [first]
            while j < n and s[j] == "|":
                option, j = self.sequence(j + 1, depth)
                options.append(option)
            if j < n and s[j] == "]":
                return (_Alternation(i, j + 1, tuple(options)),), j + 1
            raise _NoParse
        if s[j] == ":":
            when = self.number_and_close(j + 1)
            if when is not None:  # [to:when]
                number, number_pos, end = when
                return (_Edit(i, end, None, first, number, number_pos),), end
            second, k = self.sequence(j + 1, depth)
            if k < n and s[k] == ":":
                when = self.number_and_close(k + 1)
                if when is not None:  # [from:to:when]
                    number, number_pos, end = when
                    return (_Edit(i, end, first, second, number, number_pos),), end
        raise _NoParse

    def number_and_close(self, i: int) -> tuple[str, int, int] | None:
        """`[WHITESPACE] NUMBER [WHITESPACE] "]"` at `i`: (number, its offset, offset after `]`), or None."""
        s = self.text
        i = _SPACE.match(s, i).end()  # type: ignore[union-attr]
        m = _NUMBER.match(s, i)
        if m is None:
            return None
        k = _SPACE.match(s, m.end()).end()  # type: ignore[union-attr]
        if k < len(s) and s[k] == "]":
            return m.group(0), i, k + 1
        return None


def _add_range(items: list[_Item], start: int, end: int) -> None:
    if start >= end:
        return
    last = items[-1] if items else None
    if isinstance(last, tuple) and last[1] == start:
        items[-1] = (last[0], end)
    else:
        items.append((start, end))


def _extend(items: list[_Item], more: tuple[_Item, ...]) -> None:
    for item in more:
        if isinstance(item, tuple):
            _add_range(items, *item)
        else:
            items.append(item)


def _join(*parts: int | tuple[_Item, ...]) -> tuple[_Item, ...]:
    """Items for an emphasis group: ints are single bracket or colon characters kept as text."""
    items: list[_Item] = []
    for part in parts:
        if isinstance(part, int):
            _add_range(items, part, part + 1)
        else:
            _extend(items, part)
    return tuple(items)


def _constructs(items: tuple[_Item, ...]) -> Iterator[_Edit | _Alternation]:
    """Every edit and alternation, nested ones included, in text order."""
    for item in items:
        if isinstance(item, _Edit):
            yield item
            if item.before is not None:
                yield from _constructs(item.before)
            yield from _constructs(item.after)
        elif isinstance(item, _Alternation):
            yield item
            for option in item.options:
                yield from _constructs(option)


def _render(items: tuple[_Item, ...], step: int, when: dict[int, int], out: list[tuple[int, int]]) -> None:
    for item in items:
        if isinstance(item, tuple):
            out.append(item)
        elif isinstance(item, _Edit):
            if step <= when[id(item)]:
                if item.before is not None:
                    _render(item.before, step, when, out)
            else:
                _render(item.after, step, when, out)
        else:
            _render(item.options[(step - 1) % len(item.options)], step, when, out)


@dataclass(frozen=True)
class _Scheduled:
    until: int
    text: str
    ranges: tuple[tuple[int, int], ...]  # where the characters of `text` come from in the source

    def to_source(self, k: int) -> int:
        for start, end in self.ranges:
            if k < end - start:
                return start + k
            k -= end - start
        return self.ranges[-1][1] if self.ranges else 0


def _check_steps(steps: int, hires_steps: int | None) -> tuple[int, int | None]:
    for name, value in (("steps", steps), ("hires_steps", hires_steps)):
        if value is None and name == "hires_steps":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InvalidRequest(f"{name} must be a whole number of at least 1, got {value!r}.")
    return int(steps), None if hires_steps is None else int(hires_steps)


def _schedule(
    text: str, steps: int, hires_steps: int | None, old: bool, strict: bool
) -> tuple[list[_Scheduled], tuple[_Item, ...]]:
    """A1111's schedule of `text`, and the parsed items (empty when A1111's grammar fails)."""
    parser = _EditingParser(text)
    try:
        items, failures, literals = parser.top()
        if failures:
            if strict:
                _check_lost_syntax(text, items, failures)
            total = steps if hires_steps is None or old else hires_steps
            return [_Scheduled(total, text, ((0, len(text)),) if text else ())], ()
        if literals and parser.kinds:
            # Plain-text brackets next to constructs: lark may have several readings to choose from.
            readings = parser.readings()
            if len(readings) > 1:
                if strict:
                    _report_unstable(text, readings, literals, parser)
                # otherwise keep `items`, the reading with every construct (always one of lark's)
            elif readings[0] != frozenset(c.start for c in _constructs(items)):
                items, _, _ = parser.top(readings[0])
        return _schedule_items(text, items, steps, hires_steps, old), items
    except RecursionError:  # a caller's deep stack can exhaust Python's limit before MAX_NESTING
        first = min((i for i in (text.find("("), text.find("[")) if i >= 0), default=0)
        raise _Problem("Brackets starting at position {pos} are nested too deeply.", first) from None


def _schedule_items(
    text: str, items: tuple[_Item, ...], steps: int, hires_steps: int | None, old: bool
) -> list[_Scheduled]:
    """The schedule of one reading of `text` (A1111's `collect_steps` and `at_step`)."""
    if hires_steps is None or old:
        int_offset, float_offset, total = 0, 0.0, steps
    else:  # the hires pass: whole numbers count from the end of the first pass, fractions from 1.0
        int_offset, float_offset, total = steps, 1.0, hires_steps
    when: dict[int, int] = {}
    boundaries = {total}
    for construct in _constructs(items):
        if isinstance(construct, _Alternation):
            boundaries.update(range(1, total + 1))
            continue
        value = float(construct.number)
        if old:
            value = value * total if value < 1 else value
        elif "." in construct.number:
            value = (value - float_offset) * total
        else:
            value = value - int_offset
        try:
            step = min(total, int(value))
        except OverflowError:
            raise _Problem(
                "Step number {number!r} at position {pos} is out of range: A1111 fails on this prompt.",
                construct.number_pos,
                number=construct.number,
            ) from None
        when[id(construct)] = step
        if step >= 1:
            boundaries.add(step)

    schedule = []
    for step in sorted(boundaries):
        ranges: list[tuple[int, int]] = []
        _render(items, step, when, ranges)
        schedule.append(_Scheduled(step, "".join(text[a:b] for a, b in ranges), tuple(ranges)))
    return schedule


def _report_unstable(
    text: str, readings: list[frozenset[int]], literals: list[int], parser: _EditingParser
) -> None:
    pos = min(readings[0] ^ readings[1])
    found = parser.memo[pos]
    end = found[1] if found else pos
    after = [k for k in literals if k >= end]
    stray = after[0] if after else max(k for k in literals if k < pos)
    raise _Problem(
        "The prompt-editing bracket at position {pos} stands next to a bracket or colon that is plain text "
        "(at position {stray_pos}). A1111 reads such a prompt differently from one run to the next, "
        "sometimes ignoring the editing. Remove or escape (\\( \\) \\[ \\]) the stray character.",
        pos,
        stray_pos=stray,
    )


def _check_lost_syntax(text: str, items: tuple[_Item, ...], failures: list[int]) -> None:
    lost = next(_constructs(items), None)
    if lost is not None:
        pos = failures[0]
        if text[pos] == "|":
            template = (
                "'|' at position {pos} is not inside a valid [a|b] alternation, so A1111 would ignore every "
                "[from:to:when] and [a|b] in this prompt (the first is at position {lost_pos}). "
                "Escape it as \\| or fix the alternation."
            )
        else:
            template = (
                "Lone backslash at position {pos} (at the end of the text or before a line break): A1111 "
                "would then ignore every [from:to:when] and [a|b] in this prompt (the first is at position "
                "{lost_pos}). Write \\\\ for a backslash or remove it."
            )
        raise _Problem(template, pos, lost_pos=lost.start)
    # No construct would be lost; still refuse a "|" inside a "[" that fails to be an alternation.
    open_square: list[int] = []
    i, n = 0, len(text)
    failing = set(failures)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            open_square.append(i)
        elif c == "]" and open_square:
            open_square.pop()
        elif c == "|" and i in failing and open_square:
            raise _Problem(
                "'|' at position {pos} is inside the '[' at position {open_pos}, which is not a valid "
                "[a|b] alternation (an option contains ':' or an unbalanced bracket); A1111 would not "
                "parse any editing or alternation in this prompt.",
                i,
                open_pos=open_square[-1],
            )
        i += 1


def prompt_schedules(
    prompt: str,
    steps: int,
    hires_steps: int | None = None,
    use_old_timeline: bool = False,
    *,
    strict: bool = True,
) -> list[tuple[int, str]]:
    """A1111's `get_learned_conditioning_prompt_schedules` for one prompt: sorted `(until, text)` pairs.

    `until` is 1-based and inclusive in A1111's sense: the sampler, counting steps from 0, uses an
    entry while its step index is at most `until`, so the first entry serves `until + 1` model calls.
    The last `until` is always the schedule length.

    - `[from:to:when]`, `[to:when]` (empty before) and `[from::when]` (empty after); they nest, and can
      contain alternations. `when` with a `.` is a fraction of the steps, truncated (`int(0.5 * 20)`);
      without one it is a step number. The result is capped at the schedule length; below 1 means the
      "to" text from the start. So at 20 steps `1.0`, `1.5`, `5.` and `25` mean "from" for the whole run.
    - `[a|b|c]` picks option `(step - 1) % 3` at every step; all alternations advance together.
    - `hires_steps`: the schedule of the hires-fix second pass (`steps` is the first pass), `hires_steps`
      entries long. Step numbers count on from the first pass (`[a:b:25]` with 20 + 10 switches at hires
      step 5) and fractions from 1.0 (`[a:b:1.5]` switches halfway through the hires pass).
    - `use_old_timeline`: A1111's pre-1.6 setting. `when` below 1 is a fraction, otherwise a step number;
      hires offsets are not applied and the schedule is `steps` long.
    - Text outside the constructs is copied as is, emphasis brackets and escapes included.

    Raises `PromptError` for a step number that overflows, and with `strict` where A1111's grammar would
    fail and silently drop the editing in the prompt (a stray `|`, a lone trailing backslash).
    """
    steps, hires_steps = _check_steps(steps, hires_steps)
    try:
        schedule, _ = _schedule(prompt, steps, hires_steps, use_old_timeline, strict)
    except _Problem as problem:
        raise problem.to_error() from None
    return [(entry.until, entry.text) for entry in schedule]


# ---------------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------------


def _subprompt(
    text: str,
    weight: float,
    where: Callable[[int], int],
    steps: int,
    hires_steps: int | None,
    old: bool,
    strict: bool,
    tag_points: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """Schedule and emphasis of one sub-prompt; `where` maps offsets in `text` to the caller's text.

    `tag_points` are (offset in `text` where a tag was removed, the tag's offset in the caller's text).
    """
    try:
        schedule, items = _schedule(text, steps, hires_steps, old, strict)
    except _Problem as problem:
        raise problem.to_error(where) from None
    if strict and tag_points:
        for construct in _constructs(items):
            for point, tag_pos in tag_points:
                if construct.start < point < construct.end:
                    raise PromptError(
                        f"Extra-network tag at position {tag_pos} is inside the prompt-editing bracket at "
                        f"position {where(construct.start)}: A1111 removes tags before scheduling, so the "
                        "network would apply for the whole run. Move the tag outside the brackets.",
                        tag_pos,
                    )
    entries = []
    parsed: dict[str, list[tuple[str, float]]] = {}  # alternation repeats the same few texts
    for entry in schedule:
        if entry.text not in parsed:
            try:
                parsed[entry.text] = _attention(entry.text, strict)
            except _Problem as problem:
                raise problem.to_error(lambda k, entry=entry: where(entry.to_source(k))) from None
        chunks = [[t, w] for t, w in parsed[entry.text]]
        entries.append({"until": entry.until, "text": entry.text, "chunks": chunks})
    return {"text": text, "weight": weight, "schedule": entries}


def parse_prompt(
    prompt: str,
    steps: int,
    hires_steps: int | None = None,
    *,
    use_old_timeline: bool = False,
    strict: bool = True,
) -> dict[str, Any]:
    """Parse a positive prompt the way A1111 conditions on it; return a JSON-ready dict.

    Steps, in A1111's order: extra-network tags are removed (`extract_extra_networks`), the text is split
    on AND with `:weight` (`split_and`), each sub-prompt is scheduled over the steps (`prompt_schedules`,
    with `hires_steps` and `use_old_timeline` as there), and each scheduled text is split into emphasis
    runs, here called chunks (`parse_prompt_attention`):

        {"prompt": "text with tags removed",
         "extra_networks": {"lora": [["name", "0.8"]], ...},
         "subprompts": [{"text": "...", "weight": 1.0,
                         "schedule": [{"until": 10, "text": "...", "chunks": [["...", 1.1], ...]}]}]}

    `PromptError.position` counts characters in `prompt` as given, tags included.
    """
    steps, hires_steps = _check_steps(steps, hires_steps)
    try:
        extracted = _extract(prompt, strict)
    except _Problem as problem:
        raise problem.to_error() from None
    try:
        pieces = _split(extracted.text, strict)
    except _Problem as problem:
        raise problem.to_error(extracted.to_input) from None
    subprompts = []
    for start, text, weight in pieces:
        tag_points = [
            (point - start, tag_start)
            for point, tag_start, _ in extracted.tags
            if start <= point <= start + len(text)
        ]
        subprompts.append(
            _subprompt(
                text,
                weight,
                lambda k, start=start: extracted.to_input(start + k),
                steps,
                hires_steps,
                use_old_timeline,
                strict,
                tag_points,
            )
        )
    return {"prompt": extracted.text, "extra_networks": extracted.networks, "subprompts": subprompts}


def parse_negative_prompt(
    prompt: str,
    steps: int,
    hires_steps: int | None = None,
    *,
    use_old_timeline: bool = False,
    strict: bool = True,
) -> dict[str, Any]:
    """Parse a negative prompt the way A1111 conditions on it; same dict as `parse_prompt`.

    A1111 does not split negative prompts on AND (it is text, and so is a trailing `:number`), and does
    not remove extra-network tags from them: there is one sub-prompt of weight 1.0 and `extra_networks`
    is empty. With `strict`, a tag in a negative prompt raises `PromptError`, since A1111 would encode it
    as text instead of applying it.
    """
    steps, hires_steps = _check_steps(steps, hires_steps)
    if strict and (m := _TAG.search(prompt)):
        raise PromptError(
            f"Extra-network tag at position {m.start()} in a negative prompt: A1111 does not apply extra "
            "networks from negative prompts and would encode the tag as plain text. Remove it, or put it "
            "in the positive prompt.",
            m.start(),
        )
    subprompt = _subprompt(prompt, 1.0, lambda k: k, steps, hires_steps, use_old_timeline, strict)
    return {"prompt": prompt, "extra_networks": {}, "subprompts": [subprompt]}

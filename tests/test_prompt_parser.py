"""The A1111 prompt-language parser: A1111's results as literal values, and every deviation's error.

Expected values come from the behaviour spec (/work/shared/research/a1111.md, worked examples used
verbatim) and from A1111's own doctests; all of them were cross-checked against A1111's parser running
on lark 1.1.2. Weights are compared with `==`: A1111's floats are reproduced bit for bit.
"""

from __future__ import annotations

import pytest
from sdcore_plugins.prompt_language.parser import (
    MAX_NESTING,
    extract_extra_networks,
    parse_negative_prompt,
    parse_prompt,
    parse_prompt_attention,
    prompt_schedules,
    split_and,
    split_network_args,
)

from sdcore.errors import InvalidRequest, PromptError

SQ = 0.9090909090909091  # 1 / 1.1

# ---------------------------------------------------------------------------------------------------
# Emphasis
# ---------------------------------------------------------------------------------------------------

ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # nesting multiplies without rounding
    ("((a))", [("a", 1.2100000000000002)]),
    ("(((a)))", [("a", 1.3310000000000004)]),
    ("((((a))))", [("a", 1.4641000000000006)]),
    ("((a:1.2))", [("a", 1.32)]),
    ("((a):1.2)", [("a", 1.32)]),
    ("[(a:1.5)]", [("a", 1.3636363636363635)]),
    ("([a])", [("a", 1.0)]),
    ("[a]", [("a", SQ)]),
    ("[[a]]", [("a", 0.8264462809917354)]),
    ("(a)[b]", [("a", 1.1), ("b", SQ)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("((a) b)", [("a", 1.2100000000000002), (" b", 1.1)]),
    # weights
    ("(x:1.3)", [("x", 1.3)]),
    ("(a: 1.2 )", [("a", 1.2)]),
    ("(a : 1.2)", [("a ", 1.2)]),
    ("((a:  1.25 ))", [("a", 1.375)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:1.)", [("a", 1.0)]),
    ("(a:+.5)", [("a", 0.5)]),
    ("(a:1e2)", [("a:1e2", 1.1)]),
    ("(a:)", [("a:", 1.1)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(a:-)", [("a:-", 1.1)]),
    ("(a:b:1.2)", [("a:b", 1.2)]),
    ("a:1.2)", [("a:1.2)", 1.0)]),  # no "(" open: the weight is text
    ("[a:1.5)", [("a:1.5)", SQ)]),
    ("a: b", [("a: b", 1.0)]),
    # unbalanced
    ("(a", [("a", 1.1)]),
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("(a]", [("a]", 1.1)]),
    ("[(a", [("a", 1.0)]),
    # escapes
    ("\\a", [("a", 1.0)]),
    ("a\\:b", [("a:b", 1.0)]),
    ("a\\", [("a", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    ("x\\y(z)", [("xy", 1.0), ("z", 1.1)]),
    ("(a)\\", [("a", 1.1), ("", 1.0)]),  # the vanished backslash leaves an empty run
    # BREAK
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a)BREAK(b)", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
    ("(BREAK:1)", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("[(BREAK)]", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("_BREAK_ BREAKFAST break", [("_BREAK_ BREAKFAST break", 1.0)]),
    # empty
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    (
        "1girl, (masterpiece:1.2), ((best quality)), [[lowres]], (detailed eyes:1.3), red hair BREAK "
        "blue sky, \\(artist\\)",
        [
            ("1girl, ", 1.0),
            ("masterpiece", 1.2),
            (", ", 1.0),
            ("best quality", 1.2100000000000002),
            (", ", 1.0),
            ("lowres", 0.8264462809917354),
            (", ", 1.0),
            ("detailed eyes", 1.3),
            (", red hair", 1.0),
            ("BREAK", -1.0),
            ("blue sky, (artist)", 1.0),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", ATTENTION)
def test_attention(text, expected):
    runs = parse_prompt_attention(text)
    assert runs == expected
    assert all(type(w) is float for _, w in runs)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
        ("(a BREAK b", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
        ("[BREAK]", [("", SQ), ("BREAK", -SQ), ("", SQ)]),
    ],
)
def test_attention_break_in_brackets_as_a1111(text, expected):
    assert parse_prompt_attention(text, strict=False) == expected


@pytest.mark.parametrize(
    "text, position, number",
    [("(a:1.2.3)", 3, "1.2.3"), ("(a:1..2)", 3, "1..2"), ("(a:.)", 3, "."), ("x ((a:  1..2))", 8, "1..2")],
)
@pytest.mark.parametrize("strict", [True, False])
def test_attention_bad_weight(text, position, number, strict):
    with pytest.raises(PromptError) as info:
        parse_prompt_attention(text, strict=strict)
    assert info.value.position == position
    assert str(info.value) == (
        f"Invalid emphasis weight {number!r} at position {position}: A1111 fails on this prompt (it cannot "
        "convert the weight to a number). Write a number such as 1.2."
    )


@pytest.mark.parametrize(
    "text, position, weight",
    [("(a BREAK b)", 3, -1.1), ("x, (a BREAK b", 6, -1.1), ("[a BREAK]", 3, -SQ), ("(BREAK:2)", 1, -2.0)],
)
def test_attention_break_in_brackets_is_an_error(text, position, weight):
    with pytest.raises(PromptError) as info:
        parse_prompt_attention(text)
    assert info.value.position == position
    assert str(info.value) == (
        f"BREAK at position {position} is inside ( ) or [ ] brackets, so A1111 would not treat it as a chunk "
        f"break: it would encode the word BREAK with weight {weight!r}. Move BREAK outside the brackets."
    )


# ---------------------------------------------------------------------------------------------------
# Prompt editing and alternation
# ---------------------------------------------------------------------------------------------------

ALT_AB_10 = [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]

SCHEDULES = [
    # A1111's doctests (10 steps)
    ("test", 10, None, False, [(10, "test")]),
    ("a [b:3]", 10, None, False, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, False, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, False, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, False, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, False, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, False, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, False, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, False, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, None, False, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, None, False, ALT_AB_10),
    ("[fe|]male", 10, None, False, [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", 10, None, False, [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ("a [b:.5] c", 10, 10, False, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, False, [(5, "a  c"), (10, "a b c")]),
    # A1111's own comment example
    (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[ in background:0.25] [shoddy:masterful:0.5]",
        100,
        None,
        False,
        [
            (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (75, "fantasy landscape with a lake and an oak in background masterful"),
            (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ],
    ),
    # the three forms at 20 steps
    ("[cat:dog:0.5]", 20, None, False, [(10, "cat"), (20, "dog")]),
    ("[cat:dog:5]", 20, None, False, [(5, "cat"), (20, "dog")]),
    ("[cat::3]", 20, None, False, [(3, "cat"), (20, "")]),
    ("[dog:7]", 20, None, False, [(7, ""), (20, "dog")]),
    ("a [:x:3] b", 20, None, False, [(3, "a  b"), (20, "a x b")]),
    ("[a:[b:c:0.7]:0.3]", 20, None, False, [(6, "a"), (14, "b"), (20, "c")]),
    ("[a: b :5]", 20, None, False, [(5, "a"), (20, " b ")]),
    ("[a:b:5 ]", 20, None, False, [(5, "a"), (20, "b")]),
    ("[a:b:  5\n]", 20, None, False, [(5, "a"), (20, "b")]),
    (
        "(x:1.2) [a:(b:1.3):0.5] \\[y\\]",
        10,
        None,
        False,
        [(5, "(x:1.2) a \\[y\\]"), (10, "(x:1.2) (b:1.3) \\[y\\]")],
    ),
    # the number: fractions truncate, whole numbers are steps, the result is capped
    ("[a:b:0.333]", 20, None, False, [(6, "a"), (20, "b")]),
    ("[a:b:0.57]", 100, None, False, [(56, "a"), (100, "b")]),  # 0.57 * 100 == 56.99999999999999
    ("[a:b:1e1]", 20, None, False, [(10, "a"), (20, "b")]),
    ("[a:b:+3]", 20, None, False, [(3, "a"), (20, "b")]),
    ("[a:b:.5]", 20, None, False, [(10, "a"), (20, "b")]),
    ("[a:b:1.0]", 20, None, False, [(20, "a")]),
    ("[a:b:5.]", 20, None, False, [(20, "a")]),
    ("[a:b:1.5]", 20, None, False, [(20, "a")]),
    ("[a:b:25]", 20, None, False, [(20, "a")]),
    ("[a:b:0]", 20, None, False, [(20, "b")]),
    ("[a:b:-1]", 20, None, False, [(20, "b")]),
    ("[a:b:0.01]", 20, None, False, [(20, "b")]),
    ("[a:b:0.3] [c|d]", 3, None, False, [(1, "b c"), (2, "b d"), (3, "b c")]),  # int(0.3 * 3) == 0
    # alternation
    ("[a|b|c]", 6, None, False, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b"), (6, "c")]),
    ("[a|b] [c:d:3]", 4, None, False, [(1, "a c"), (2, "b c"), (3, "a c"), (4, "b d")]),
    (
        "[a|b] [c|d|e]",
        6,
        None,
        False,
        [(1, "a c"), (2, "b d"), (3, "a e"), (4, "b c"), (5, "a d"), (6, "b e")],
    ),
    ("[[a|b]:c:2]", 4, None, False, [(1, "a"), (2, "b"), (3, "c"), (4, "c")]),
    ("[a|[b:c:2]]", 4, None, False, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("a \\| b [c|d]", 2, None, False, [(1, "a \\| b c"), (2, "a \\| b d")]),
    # hires second pass: base 20, hires 10
    ("[a:b:1.5]", 20, 10, False, [(5, "a"), (10, "b")]),
    ("[a:b:0.5]", 20, 10, False, [(10, "b")]),
    ("[a:b:25]", 20, 10, False, [(5, "a"), (10, "b")]),
    ("[a:b:5]", 20, 10, False, [(10, "b")]),
    ("a [b:1.5] [c:25] (d:1.1)", 20, 4, False, [(2, "a   (d:1.1)"), (4, "a b  (d:1.1)")]),
    ("[a|b]", 20, 3, False, [(1, "a"), (2, "b"), (3, "a")]),
    # old timeline
    ("[a:b:1.0]", 20, None, True, [(1, "a"), (20, "b")]),
    ("[a:b:5.]", 20, None, True, [(5, "a"), (20, "b")]),
    ("[a:b:1.5]", 20, None, True, [(1, "a"), (20, "b")]),
    ("[a:b:0.5]", 20, None, True, [(10, "a"), (20, "b")]),
    ("[a:b:0.5]", 20, 10, True, [(10, "a"), (20, "b")]),  # no hires offsets, base steps
    # A1111's grammar fails: the prompt stays as it is (nothing would be lost, so no error)
    ("{red|blue} dress", 20, None, False, [(20, "{red|blue} dress")]),
    ("a | [b] (c)", 5, None, False, [(5, "a | [b] (c)")]),
    ("a\\", 5, None, False, [(5, "a\\")]),
    ("[a:b:c:5]", 20, None, False, [(20, "[a:b:c:5]")]),
    ("[a:b:5x]", 20, None, False, [(20, "[a:b:5x]")]),
    ("[a:b:1e]", 20, None, False, [(20, "[a:b:1e]")]),
    # deterministic readings next to stray brackets
    ("[a:3] ]", 10, None, False, [(3, " ]"), (10, "a ]")]),
    ("(x[a:3]", 10, None, False, [(3, "(x"), (10, "(xa")]),
    ("[[a:3]", 10, None, False, [(3, "["), (10, "[a")]),
    ("[a|b]]", 2, None, False, [(1, "a]"), (2, "b]")]),
    ("[a:b:5] (c)]", 10, None, False, [(5, "a (c)]"), (10, "b (c)]")]),
    ("(x, [a:b:5]), y)", 10, None, False, [(5, "(x, a), y)"), (10, "(x, b), y)")]),
    ("x [a:b:5], (c:1.2)]", 10, None, False, [(5, "x a, (c:1.2)]"), (10, "x b, (c:1.2)]")]),
    ("", 20, None, False, [(20, "")]),
]


@pytest.mark.parametrize("prompt, steps, hires, old, expected", SCHEDULES)
def test_schedules(prompt, steps, hires, old, expected):
    assert prompt_schedules(prompt, steps, hires, old) == expected


def test_cat_dog_switches_where_a1111_switches():
    schedule = prompt_schedules("a [cat:dog:0.5]", 20)
    # the sampler (0-based step index i) uses the first entry whose until >= i
    used = [next(text for until, text in schedule if i <= until) for i in range(20)]
    assert used == ["a cat"] * 11 + ["a dog"] * 9


@pytest.mark.parametrize(
    "prompt, steps, expected",
    [
        # A1111 ignores all editing here: the grammar fails on the "|"
        ("a dog | cat [x:y:5]", 20, [(20, "a dog | cat [x:y:5]")]),
        ("[a|b:5] [c:d:2]", 20, [(20, "[a|b:5] [c:d:2]")]),
        ("[c:d:2] x\\", 20, [(20, "[c:d:2] x\\")]),
        ("a [{b|d{:.5] c", 10, [(10, "a [{b|d{:.5] c")]),  # A1111's doctest claims otherwise; it is stale
        # A1111 reads these either way depending on its process; sdcore takes the editing
        ("[a:b:5]]", 20, [(5, "a]"), (20, "b]")]),
        ("[cat:dog:0.5]) b", 20, [(10, "cat) b"), (20, "dog) b")]),
    ],
)
def test_schedules_non_strict_as_a1111(prompt, steps, expected):
    assert prompt_schedules(prompt, steps, strict=False) == expected


PIPE_LOST = (
    "'|' at position {pos} is not inside a valid [a|b] alternation, so A1111 would ignore every "
    "[from:to:when] and [a|b] in this prompt (the first is at position {lost}). "
    "Escape it as \\| or fix the alternation."
)
PIPE_IN_BRACKET = (
    "'|' at position {pos} is inside the '[' at position {open}, which is not a valid [a|b] alternation "
    "(an option contains ':' or an unbalanced bracket); A1111 would not parse any editing or alternation "
    "in this prompt."
)
BACKSLASH_LOST = (
    "Lone backslash at position {pos} (at the end of the text or before a line break): A1111 would then "
    "ignore every [from:to:when] and [a|b] in this prompt (the first is at position {lost}). Write \\\\ for "
    "a backslash or remove it."
)
UNSTABLE = (
    "The prompt-editing bracket at position {pos} stands next to a bracket or colon that is plain text (at "
    "position {stray}). A1111 reads such a prompt differently from one run to the next, sometimes ignoring "
    "the editing. Remove or escape (\\( \\) \\[ \\]) the stray character."
)


@pytest.mark.parametrize(
    "prompt, message, position",
    [
        ("a dog | cat [x:y:5]", PIPE_LOST.format(pos=6, lost=12), 6),
        ("{a|b} [c:d:5]", PIPE_LOST.format(pos=2, lost=6), 2),
        ("[a|b] c | [d|e]", PIPE_LOST.format(pos=8, lost=0), 8),
        ("[a|b:5]", PIPE_IN_BRACKET.format(pos=2, open=0), 2),
        ("x [(a:b:c)|d]", PIPE_IN_BRACKET.format(pos=10, open=2), 10),
        ("[a|(b]", PIPE_IN_BRACKET.format(pos=2, open=0), 2),
        ("a [{b|d{:.5] c", PIPE_IN_BRACKET.format(pos=5, open=2), 5),
        ("[a:b:5] x\\", BACKSLASH_LOST.format(pos=9, lost=0), 9),
        ("[a|b] x\\\ny", BACKSLASH_LOST.format(pos=7, lost=0), 7),
        ("[cat:dog:0.5]]", UNSTABLE.format(pos=0, stray=13), 0),
        ("x, [a:b:5])", UNSTABLE.format(pos=3, stray=10), 3),
        ("[a:3]:", UNSTABLE.format(pos=0, stray=5), 0),
        ("[a:3](", UNSTABLE.format(pos=0, stray=5), 0),
        ("(2[:3]]", UNSTABLE.format(pos=2, stray=6), 2),
        ("[x [y:1] z:2]]", UNSTABLE.format(pos=0, stray=13), 0),
        ("[a:b:5](c)]", UNSTABLE.format(pos=0, stray=10), 0),
        ("[cat:dog:0.5](masterpiece, 1girl", UNSTABLE.format(pos=0, stray=13), 0),
    ],
)
def test_schedules_lost_syntax_is_an_error(prompt, message, position):
    with pytest.raises(PromptError) as info:
        prompt_schedules(prompt, 20)
    assert info.value.position == position
    assert str(info.value) == message


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    "prompt, position, number",
    [("[a:b:1e999]", 5, "1e999"), ("x [a:-1e400]", 5, "-1e400"), ("[a|[b:c:1.5e999]]", 8, "1.5e999")],
)
def test_schedules_step_overflow(prompt, position, number, strict):
    with pytest.raises(PromptError) as info:
        prompt_schedules(prompt, 20, strict=strict)
    assert info.value.position == position
    assert (
        str(info.value)
        == f"Step number {number!r} at position {position} is out of range: A1111 fails on this prompt."
    )


def test_schedules_nesting_limit():
    assert prompt_schedules("[" * MAX_NESTING + "a:1" + "]" * MAX_NESTING, 2)[0][0] == 1
    assert prompt_schedules("(" * 1000 + "a", 2) == [(2, "(" * 1000 + "a")]  # unclosed: plain text
    deep = "[" * (MAX_NESTING + 1) + "a" + "]" * (MAX_NESTING + 1)
    with pytest.raises(PromptError) as info:
        prompt_schedules(deep, 2, strict=False)
    assert info.value.position == MAX_NESTING
    assert (
        str(info.value)
        == f"Brackets at position {MAX_NESTING} are nested more than {MAX_NESTING} levels deep."
    )


@pytest.mark.parametrize("steps, hires", [(0, None), (-1, None), (20, 0), (1.5, None), (True, None)])
def test_schedules_bad_step_counts(steps, hires):
    with pytest.raises(InvalidRequest):
        prompt_schedules("a", steps, hires)


# ---------------------------------------------------------------------------------------------------
# AND
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a AND b:0.5", [("a", 1.0), (" b", 0.5)]),
        ("a AND b", [("a", 1.0), (" b", 1.0)]),
        ("a AND b : -0.5 ", [("a", 1.0), (" b", -0.5)]),
        ("a:1.2 AND b:+2", [("a", 1.2), (" b", 2.0)]),
        ("a,AND,b", [("a,", 1.0), (",b", 1.0)]),
        ("aANDb", [("aANDb", 1.0)]),
        ("a AND_b", [("a AND_b", 1.0)]),
        ("a and b", [("a and b", 1.0)]),
        ("a:1.2.3", [("a:1.2.3", 1.0)]),
        ("a:1,5", [("a:1,5", 1.0)]),
        ("a:1e2", [("a:1e2", 1.0)]),
        ("cat:2.", [("cat", 2.0)]),
        ("cat:.5", [("cat", 0.5)]),
        ("rating: safe, score: 9", [("rating: safe, score", 9.0)]),
        ("AND a", [("", 1.0), (" a", 1.0)]),
        ("a AND", [("a", 1.0), ("", 1.0)]),
        ("a AND AND b", [("a", 1.0), ("", 1.0), (" b", 1.0)]),
        ("(a AND b", [("(a", 1.0), (" b", 1.0)]),
        ("a\n AND\tb \n", [("a", 1.0), ("\tb", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


@pytest.mark.parametrize(
    "prompt, expected",
    [("(a AND b)", [("(a", 1.0), (" b)", 1.0)]), ("[a AND b:5]", [("[a", 1.0), (" b:5]", 1.0)])],
)
def test_split_and_across_brackets_as_a1111(prompt, expected):
    assert split_and(prompt, strict=False) == expected


@pytest.mark.parametrize(
    "prompt, position, opened",
    [("(a AND b)", 3, 0), ("x [a AND b:5]", 5, 2), ("(a AND b:1.2)", 3, 0), ("((a) AND b)", 5, 0)],
)
def test_split_and_across_brackets_is_an_error(prompt, position, opened):
    with pytest.raises(PromptError) as info:
        split_and(prompt)
    assert info.value.position == position
    assert str(info.value) == (
        f"AND at position {position} is inside the bracket opened at position {opened}: A1111 splits on AND "
        "regardless of brackets, which would break that bracket pair. Close the bracket before AND, or write "
        "'and' if you meant the word."
    )


# ---------------------------------------------------------------------------------------------------
# Extra networks
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected_text, expected_networks",
    [
        ("a, <lora:x:1>, b", "a, , b", {"lora": [["x", "1"]]}),
        ("<lora:name:0.8>", "", {"lora": [["name", "0.8"]]}),
        ("x <lora:name:te=0.5:unet=1>", "x ", {"lora": [["name", "te=0.5", "unet=1"]]}),
        ("<hypernet:x>", "", {"hypernet": [["x"]]}),
        ("<LoRA:x>", "", {"LoRA": [["x"]]}),
        (
            "<lora:a:1> b <hypernet:h:0.3>, <lyco:c:0.5:0.2:8> <lora:d>",
            " b ,  ",
            {"lora": [["a", "1"], ["d"]], "hypernet": [["h", "0.3"]], "lyco": [["c", "0.5", "0.2", "8"]]},
        ),
        ("<lora::>", "", {"lora": [["", ""]]}),
        ("<lora:>", "<lora:>", {}),
        ("a <b c:d> e", "a <b c:d> e", {}),
        ("x < y", "x < y", {}),
        ("ratio <16:9", "ratio <16:9", {}),
    ],
)
def test_extract_extra_networks(text, expected_text, expected_networks):
    assert extract_extra_networks(text) == (expected_text, expected_networks)


def test_extract_extra_networks_as_a1111():
    assert extract_extra_networks("a <lora:x:0.8", strict=False) == ("a <lora:x:0.8", {})
    assert extract_extra_networks("<lora:a:0.8, <lora:b:1>", strict=False) == (
        "",
        {"lora": [["a", "0.8, <lora", "b", "1"]]},
    )
    assert split_and("a <lora:x:0.8", strict=False) == [("a <lora:x", 0.8)]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["name", "0.8"], (["name", "0.8"], {})),
        (["name", "te=0.5", "unet=1"], (["name"], {"te": "0.5", "unet": "1"})),
        (["name", "0.8", "dyn=8"], (["name", "0.8"], {"dyn": "8"})),
        (["a=b=c"], (["a=b=c"], {})),
    ],
)
def test_split_network_args(args, expected):
    assert split_network_args(args) == expected


@pytest.mark.parametrize(
    "text, message, position",
    [
        (
            "a, <lora:x:0.8",
            "Extra-network tag at position 3 is not closed with '>': A1111 would keep it as plain text and not "
            "load the network.",
            3,
        ),
        (
            "<lora:a:1> b <lora:x:0.8",
            "Extra-network tag at position 13 is not closed with '>': A1111 would keep it as plain text and not "
            "load the network.",
            13,
        ),
        (
            "x <lora:a:0.8, <lora:b:1>",
            "Extra-network tag at position 2 runs into another tag at position 15 (a '>' is missing): A1111 "
            "would read both as one tag with garbled arguments.",
            2,
        ),
    ],
)
def test_extract_extra_networks_errors(text, message, position):
    with pytest.raises(PromptError) as info:
        extract_extra_networks(text)
    assert info.value.position == position
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------------

CIVITAI = (
    "masterpiece, best quality, ultra-detailed, (1girl:1.3), solo, ((long silver hair)), (blue eyes:1.2), "
    "[smile:grin:0.4], (school uniform:1.1), [[simple background]], <lora:add_detail:0.6>, "
    "<lora:animeStyle:te=0.8:unet=1>, cinematic lighting BREAK cherry blossoms, petals, (wind:0.8), "
    "\\(artist name\\)"
)


def _civitai_chunks(expression: str) -> list[list]:
    return [
        ["masterpiece, best quality, ultra-detailed, ", 1.0],
        ["1girl", 1.3],
        [", solo, ", 1.0],
        ["long silver hair", 1.2100000000000002],
        [", ", 1.0],
        ["blue eyes", 1.2],
        [f", {expression}, ", 1.0],
        ["school uniform", 1.1],
        [", ", 1.0],
        ["simple background", 0.8264462809917354],
        [", , , cinematic lighting", 1.0],
        ["BREAK", -1.0],
        ["cherry blossoms, petals, ", 1.0],
        ["wind", 0.8],
        [", (artist name)", 1.0],
    ]


def test_parse_prompt_civitai():
    stripped = (
        "masterpiece, best quality, ultra-detailed, (1girl:1.3), solo, ((long silver hair)), (blue eyes:1.2), "
        "[smile:grin:0.4], (school uniform:1.1), [[simple background]], , , cinematic lighting BREAK cherry "
        "blossoms, petals, (wind:0.8), \\(artist name\\)"
    )
    assert parse_prompt(CIVITAI, 10) == {
        "prompt": stripped,
        "extra_networks": {"lora": [["add_detail", "0.6"], ["animeStyle", "te=0.8", "unet=1"]]},
        "subprompts": [
            {
                "text": stripped,
                "weight": 1.0,
                "schedule": [
                    {
                        "until": 4,
                        "text": stripped.replace("[smile:grin:0.4]", "smile"),
                        "chunks": _civitai_chunks("smile"),
                    },
                    {
                        "until": 10,
                        "text": stripped.replace("[smile:grin:0.4]", "grin"),
                        "chunks": _civitai_chunks("grin"),
                    },
                ],
            }
        ],
    }


def test_parse_prompt_and_alternation_hypernet():
    prompt = "a photo of a [cat|dog] AND a [red:blue:3] ball:0.7 AND <hypernet:sketch:0.5>(((sunset))) :1.2"
    cat, dog = "a photo of a cat", "a photo of a dog"
    assert parse_prompt(prompt, 4) == {
        "prompt": "a photo of a [cat|dog] AND a [red:blue:3] ball:0.7 AND (((sunset))) :1.2",
        "extra_networks": {"hypernet": [["sketch", "0.5"]]},
        "subprompts": [
            {
                "text": "a photo of a [cat|dog]",
                "weight": 1.0,
                "schedule": [
                    {"until": 1, "text": cat, "chunks": [[cat, 1.0]]},
                    {"until": 2, "text": dog, "chunks": [[dog, 1.0]]},
                    {"until": 3, "text": cat, "chunks": [[cat, 1.0]]},
                    {"until": 4, "text": dog, "chunks": [[dog, 1.0]]},
                ],
            },
            {
                "text": " a [red:blue:3] ball",
                "weight": 0.7,
                "schedule": [
                    {"until": 3, "text": " a red ball", "chunks": [[" a red ball", 1.0]]},
                    {"until": 4, "text": " a blue ball", "chunks": [[" a blue ball", 1.0]]},
                ],
            },
            {
                "text": " (((sunset)))",
                "weight": 1.2,
                "schedule": [
                    {
                        "until": 4,
                        "text": " (((sunset)))",
                        "chunks": [[" ", 1.0], ["sunset", 1.3310000000000004]],
                    }
                ],
            },
        ],
    }


def test_parse_prompt_hires_pass():
    assert parse_prompt("a [b:1.5] [c:25] (d:1.1)", 20, 4)["subprompts"][0]["schedule"] == [
        {"until": 2, "text": "a   (d:1.1)", "chunks": [["a   ", 1.0], ["d", 1.1]]},
        {"until": 4, "text": "a b  (d:1.1)", "chunks": [["a b  ", 1.0], ["d", 1.1]]},
    ]
    old = parse_prompt("[a:b:1.5]", 20, 10, use_old_timeline=True)["subprompts"][0]["schedule"]
    assert [(e["until"], e["text"]) for e in old] == [(1, "a"), (20, "b")]


def test_parse_prompt_empty():
    assert parse_prompt("", 5) == {
        "prompt": "",
        "extra_networks": {},
        "subprompts": [
            {"text": "", "weight": 1.0, "schedule": [{"until": 5, "text": "", "chunks": [["", 1.0]]}]}
        ],
    }


def test_parse_prompt_tags_in_alternation_as_a1111():
    result = parse_prompt("x, [<lora:a:1>|<lora:b:1>]", 2, strict=False)
    assert result["prompt"] == "x, [|]"
    assert result["extra_networks"] == {"lora": [["a", "1"], ["b", "1"]]}
    assert [(e["until"], e["text"]) for e in result["subprompts"][0]["schedule"]] == [(1, "x, "), (2, "x, ")]


@pytest.mark.parametrize(
    "prompt, position, message",
    [
        # positions count in the prompt as written, tags included
        (
            "<lora:a:1> x AND (a:1..2)",
            20,
            "Invalid emphasis weight '1..2' at position 20: A1111 fails on this prompt (it cannot convert the "
            "weight to a number). Write a number such as 1.2.",
        ),
        (
            "<lora:a:1> [x|y] AND [(a:1..2)|b]",
            25,
            "Invalid emphasis weight '1..2' at position 25: A1111 fails on this prompt (it cannot convert the "
            "weight to a number). Write a number such as 1.2.",
        ),
        (
            "<lora:a:1> [x:y:3] (a BREAK b",
            22,
            "BREAK at position 22 is inside ( ) or [ ] brackets, so A1111 would not treat it as a chunk break: "
            "it would encode the word BREAK with weight -1.1. Move BREAK outside the brackets.",
        ),
        ("<hypernet:h> {a|b} [c:d:5]", 15, PIPE_LOST.format(pos=15, lost=19)),
        ("<lora:a:1> x AND [c:d:5]]", 17, UNSTABLE.format(pos=17, stray=24)),
        (
            "<lora:a:1> (x AND y)",
            14,
            "AND at position 14 is inside the bracket opened at position 11: A1111 splits on AND regardless of "
            "brackets, which would break that bracket pair. Close the bracket before AND, or write 'and' if you "
            "meant the word.",
        ),
        (
            "x, [<lora:a:1>|<lora:b:1>]",
            4,
            "Extra-network tag at position 4 is inside the prompt-editing bracket at position 3: A1111 removes "
            "tags before scheduling, so the network would apply for the whole run. Move the tag outside the "
            "brackets.",
        ),
        (
            "<lora:a:1> y AND [cat <lora:c:1>:dog:0.5]",
            22,
            "Extra-network tag at position 22 is inside the prompt-editing bracket at position 17: A1111 "
            "removes tags before scheduling, so the network would apply for the whole run. Move the tag outside "
            "the brackets.",
        ),
        (
            "x <lora:a:0.8",
            2,
            "Extra-network tag at position 2 is not closed with '>': A1111 would keep it as plain text and not "
            "load the network.",
        ),
        (
            "<lora:a:1> [a:b:1e999]",
            16,
            "Step number '1e999' at position 16 is out of range: A1111 fails on this prompt.",
        ),
    ],
)
def test_parse_prompt_errors(prompt, position, message):
    with pytest.raises(PromptError) as info:
        parse_prompt(prompt, 20)
    assert info.value.position == position
    assert str(info.value) == message
    assert info.value.code == "bad_prompt"


def test_parse_prompt_tag_in_emphasis_is_fine():
    result = parse_prompt("(<lora:a:0.5>), b", 20)
    assert result["prompt"] == "(), b"
    assert result["subprompts"][0]["schedule"][0]["chunks"] == [[", b", 1.0]]


def test_parse_negative_prompt():
    assert parse_negative_prompt("a AND b:0.5, [x:y:0.5]", 4) == {
        "prompt": "a AND b:0.5, [x:y:0.5]",
        "extra_networks": {},
        "subprompts": [
            {
                "text": "a AND b:0.5, [x:y:0.5]",
                "weight": 1.0,
                "schedule": [
                    {"until": 2, "text": "a AND b:0.5, x", "chunks": [["a AND b:0.5, x", 1.0]]},
                    {"until": 4, "text": "a AND b:0.5, y", "chunks": [["a AND b:0.5, y", 1.0]]},
                ],
            }
        ],
    }
    worst = parse_negative_prompt("(worst quality:1.4), (a AND b)", 20)["subprompts"][0]["schedule"]
    assert worst[0]["chunks"] == [["worst quality", 1.4], [", ", 1.0], ["a AND b", 1.1]]


def test_parse_negative_prompt_tags():
    with pytest.raises(PromptError) as info:
        parse_negative_prompt("lowres, <lora:bad:1>", 20)
    assert info.value.position == 8
    assert str(info.value) == (
        "Extra-network tag at position 8 in a negative prompt: A1111 does not apply extra networks from "
        "negative prompts and would encode the tag as plain text. Remove it, or put it in the positive prompt."
    )
    kept = parse_negative_prompt("lowres, <lora:bad:1>", 20, strict=False)
    assert kept["extra_networks"] == {}
    assert kept["subprompts"][0]["schedule"][0]["chunks"] == [["lowres, <lora:bad:1>", 1.0]]


def test_parse_prompt_is_json_ready():
    import json

    result = parse_prompt("a [b|c] (d:1.2) BREAK e AND f:0.5 <lora:x:1>", 3)
    assert json.loads(json.dumps(result)) == result

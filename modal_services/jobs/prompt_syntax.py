"""The prompt syntax people bring from A1111 and Forge: attention weights and BREAK.

Parsed by A1111's own rules (its `modules/prompt_parser.py`, `parse_prompt_attention`):

- `(words)` multiplies the words' weight by 1.1, `[words]` divides it by 1.1,
  `(words:1.5)` multiplies it by 1.5; brackets nest, and their factors multiply;
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters (a tag like
  `hatsune miku \\(vocaloid\\)`); any other backslash is dropped;
- a bracket left open weights everything after it; a closing bracket with
  nothing open, or a `:` that ends no weight, is plain text;
- `BREAK`, in capitals and as a word of its own, starts a new chunk of the
  encoding (`prompt_encoding.py`).

Neighbouring runs of equal weight are joined, as A1111 joins them, so
`(a)(b)` is the one word `ab` at 1.1.

One departure: A1111 reads a BREAK inside brackets as the word "BREAK" at a
negative weight (its marker's weight is multiplied with the rest); here a BREAK
is a BREAK wherever it stands.

Pure Python: the request models (which the bot imports) use it to screen the
words the model will read.
"""

from __future__ import annotations

import re
from typing import NamedTuple

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: the character itself
    | \\                    # any other backslash: dropped
    | \( | \[
    | :([+-]?[.\d]+)\)      # the weight that closes `(words:1.5)`
    | \) | \]
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that ends no weight: plain text
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


class Run(NamedTuple):
    """Text the encoders read with one weight."""

    text: str
    weight: float


def _number(text: str | None) -> float | None:
    """The weight written in `(words:W)`; None where W is no number (`(a:.)`, which A1111 fails on)."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _weighted_pieces(prompt: str) -> list[list]:
    """[text, weight] pieces in order, None as the text of a BREAK; brackets applied, runs not yet joined."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(prompt):
        token, weight = match.group(0), _number(match.group(1))
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), weight)
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_FACTOR)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append([None, 1.0])
                pieces.append([part, 1.0])
    for start in open_round:
        multiply_from(start, ROUND_FACTOR)
    for start in open_square:
        multiply_from(start, SQUARE_FACTOR)
    return pieces


def parse_attention(prompt: str) -> list[list[Run]]:
    """The prompt's runs of text and weight, in the segments BREAK separates (at least one, each with a run)."""
    segments: list[list[Run]] = [[]]
    for text, weight in _weighted_pieces(prompt):
        if text is None:
            segments.append([])
            continue
        segment = segments[-1]
        if segment and segment[-1].weight == weight:
            segment[-1] = Run(segment[-1].text + text, weight)
        else:
            segment.append(Run(text, weight))
    return [segment or [Run("", 1.0)] for segment in segments]


def plain_text(prompt: str) -> str:
    """The words the encoders read, without weights or BREAK (its segments joined by a space):
    `(masterpiece:1.2), [blurry] BREAK a fox` → `masterpiece, blurry a fox`."""
    return " ".join("".join(run.text for run in segment) for segment in parse_attention(prompt))

"""Prompt screening before any GPU work: the same check in the bot, the HTTP API, the CLI and the worker.

Two lists:

- Built in and always on: sexual content involving minors. A prompt is refused
  when it pairs a word for a minor (or a stated age under 18, or a school
  grade) with a sexual word, or uses a term that means that pairing by itself.
  Neither half alone refuses anything ("child" and "nude" are each fine in
  their own prompts), so the minor words can be plain and the sexual words
  broad. The words, in twelve languages, are in `lexicon.py`.
- A server's own refused words and phrases (`/settings safety`).

What the negative prompt can do: it pushes the image away from its words.
Words there are avoided, never asked for, so "child" in a negative prompt
must not refuse an adult prompt. What it can add is the missing half of the
pairing by steering away from it: "adult, mature" negated on a sexual prompt,
or "clothes" negated on a prompt about a child, asks for the same thing as
spelling it out. Those two tricks are refused; "mature content" or "torn
clothes" in a negative prompt steer away from something else and pass. A
server's words only count in the positive prompt (and the per-region prompts).

Matching works on folded text (`folding.py`: case, accents, look-alike letters,
invisible characters), on words and phrases, with digits for letters (`l0l1`),
letters spaced or dotted apart (`n u d e`), words split in two or three
(`chi ld`, `c hi ld`), repeated letters (`nuuude`), and a minor word and a
sexual word run together in one token (`nudechild`). Chinese and Japanese are
matched inside the text, Korean words with their particles. A refusal never
names the word that matched: the message says what kind of thing was asked
for, not how to get around the list.
"""

from __future__ import annotations

import re
from typing import Iterable

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.safety import lexicon
from modal_services.safety.folding import LEET, fold
from modal_services.safety.term_index import Hit, TermIndex, builtin_index, tokens

MINOR_REFUSAL = (
    "This prompt was refused: it asks for sexual content involving minors, which this bot never makes, "
    "on any server."
)
SERVER_REFUSAL = "This prompt uses words this server does not allow; please rephrase it."

_LETTER = r"[^\W\d_]"
_SEGMENT_BREAK = re.compile(r"[,;\n|()\[\]{}<>]+")
# Words with the symbols that stand in for letters; punctuation around a word is not part of it.
_LEET_WORD = re.compile(r"(?:[^\W_]|[@$!|+])+")


def _number_words() -> dict[str, int]:
    numbers: dict[str, int] = {}
    for words in lexicon.LEXICON.values():
        for entry in lexicon.terms(words.get("numbers", "")):
            word, value = entry.rsplit(" ", 1)
            numbers[fold(word)] = int(value)
    return numbers


def _alternation(words: Iterable[str], spaced: bool = True) -> str:
    """A regex alternation of folded words, longest first; a space matches any run of spaces, `-` or `_`."""
    escaped = (re.escape(fold(word)) for word in sorted(words, key=len, reverse=True))
    return "|".join(word.replace(r"\ ", r"[\s_-]*").replace(r"\-", r"[\s_-]*") if spaced else word
                    for word in escaped)


def _bounded(words: Iterable[str]) -> str:
    """Words that must not be glued to a letter before or after (`page 12` is not `age 12`)."""
    return rf"(?<!{_LETTER})(?:{_alternation(words)})(?!{_LETTER})"


_NUMBER_WORDS = _number_words()
_NUMBER = (rf"(?<![\d.])\d{{1,2}}(?![\d.]\d)|(?<![一二三四五六七八九十百两])(?:{_alternation(_NUMBER_WORDS)})"
           rf"|(?<!{_LETTER})(?:{_alternation(word for word in _NUMBER_WORDS if word.isascii())})")
_AGE_UNITS = lexicon.terms(lexicon.AGE_UNITS)
_LETTER_UNITS = [unit for unit in _AGE_UNITS if re.search(_LETTER, unit[-1]) and ord(unit[-1]) < 0x3000]
_AGE = re.compile(
    rf"(?P<number>{_NUMBER})[\s_-]*(?:{_alternation(_LETTER_UNITS)})(?!{_LETTER})"
    rf"|(?P<number_cjk>{_NUMBER})\s*(?:{_alternation(set(_AGE_UNITS) - set(_LETTER_UNITS))})"
    rf"|{_bounded(lexicon.terms(lexicon.AGE_PREFIXES))}[\s:=_-]*(?P<number_after>{_NUMBER})(?!{_LETTER})"
)
_GRADE = re.compile(
    rf"(?<!{_LETTER})(?:\d{{1,2}}(?:st|nd|rd|th|e|o|\.)?|{_alternation(lexicon.terms(lexicon.ORDINALS))})[\s_-]*"
    rf"{_bounded(lexicon.terms(lexicon.GRADE_WORDS))}"
    rf"|{_bounded(['grade', 'klasse', 'klasa', 'класс', 'sinif'])}[\s_-]*\d{{1,2}}(?!\d)"
    rf"|\d{{1,2}}\s*年生"
)


# Where a stated age or grade can start: a digit, a CJK numeral, or a word that opens one (a number word, an ordinal,
# "aged", "grade"), or a number word with its unit in one word ("zwölfjährige", "dwunastoletnia").
_OPENING_WORDS = {fold(term).split()[0] for term in [
    *_NUMBER_WORDS, *lexicon.terms(lexicon.ORDINALS), *lexicon.terms(lexicon.AGE_PREFIXES),
    *lexicon.terms(lexicon.GRADE_WORDS)]}
_COMPOUND_UNITS = tuple(fold(unit) for unit in _LETTER_UNITS if len(unit) > 4)
_OPENINGS = re.compile(r"(?<![\d一二三四五六七八九十两])[\d一二三四五六七八九十两]"
                       r"|(?<![^\W\d_])[^\W\d_一二三四五六七八九十两]+")


def _minor_age_or_grade(folded: str) -> bool:
    """A stated age under 18 ("12yo", "aged twelve", "12 años", "12歳") or a school grade ("5th grader")."""
    for opening in _OPENINGS.finditer(folded):
        word = opening.group()
        if not (len(word) == 1 or word in _OPENING_WORDS or word.endswith(_COMPOUND_UNITS)):
            continue
        if _GRADE.match(folded, opening.start()):
            return True
        age = _AGE.match(folded, opening.start())
        if age:
            number = next(group for group in age.groups() if group)
            value = int(number) if number.isdigit() else _NUMBER_WORDS[re.sub(r"[\s_-]+", " ", number)]
            if 0 < value < 18:
                return True
    return False


def _hits(index: TermIndex, folded: str, words: list[str]) -> list[Hit]:
    """Every term of `index` found in a folded text (and its words), however it was written."""
    hits = index.cjk_hits(folded)
    words = index.words_without_benign(words)
    hits += index.sequence_hits(words)
    leet_words = [word.strip("!|+").translate(LEET) for word in _LEET_WORD.findall(folded)]
    leet_words = index.words_without_benign([word for word in leet_words if word])
    changed = {position for position, word in enumerate(leet_words)
               if position >= len(words) or word != words[position]}
    if changed:
        hits += index.sequence_hits(leet_words, near=changed)
    return hits


class Reading:
    """What one text asks for: its minor terms, sexual terms, and whether it pairs them by itself."""

    def __init__(self, text: str, index: TermIndex | None = None):
        index = index or builtin_index()
        folded = fold(text)
        words = tokens(folded)
        self.hits = _hits(index, folded, words)
        self.minor = [hit for hit in self.hits if hit.kind == "minor"]
        if _minor_age_or_grade(folded):
            self.minor.append(Hit("minor", None))
        self.sexual = [hit for hit in self.hits if hit.kind == "sexual"]
        self.kinds = {hit.kind for hit in self.hits}

    def pairs_minor_with_sexual(self) -> bool:
        if "minor_sexual" in self.kinds:
            return True
        return any(minor.pairs_with(sexual) for minor in self.minor for sexual in self.sexual)


def _segments(negative: str) -> list[str]:
    return [segment.strip() for segment in _SEGMENT_BREAK.split(negative) if segment.strip()]


def _steers_away_from_adulthood(negative: str) -> bool:
    """A part of the negative prompt that avoids being adult ("adult", "mature body"), not adult content."""
    for segment in _segments(fold(negative)):
        kinds = Reading(segment).kinds
        if "adult" in kinds and "content" not in kinds:
            return True
    return False


def _steers_away_from_clothing(negative: str) -> bool:
    """A part of the negative prompt that is only a word for being dressed ("clothes", "fully clothed"), not a
    kind of clothing ("torn clothes")."""
    modifiers = {fold(word) for word in lexicon.terms(lexicon.CLOTHING_MODIFIERS)}
    index = builtin_index()
    for segment in _segments(fold(negative)):
        words = [word for word in tokens(segment) if word not in modifiers]
        if words and index.is_exactly(words, "clothing"):
            return True
    return False


def asks_for_sexual_content(positive: str, negative: str = "") -> bool:
    """Sexual words in what a prompt asks for, or only a word for being dressed in what its negative prompt
    steers away from (which asks for nudity as plainly)."""
    asked = Reading(positive)
    return bool(asked.sexual) or "minor_sexual" in asked.kinds or _steers_away_from_clothing(negative)


def involves_minors_sexually(positive: str, negative: str = "") -> bool:
    """The built-in rule: what the prompt asks for, with what its negative prompt steers away from."""
    asked = Reading(positive)
    if asked.pairs_minor_with_sexual():
        return True
    if asked.sexual and _steers_away_from_adulthood(negative):
        return True
    return bool(asked.minor) and _steers_away_from_clothing(negative)


def screen_prompt(positive: Iterable[str], negative: Iterable[str] = (), server_words: Iterable[str] = ()) -> None:
    """Raises INVALID_PROMPT if the positive texts (a prompt, region prompts) with the negative ones break the
    built-in rule, or if a positive text uses one of the server's refused words or phrases."""
    asked = ", ".join(text for text in positive if text)
    avoided = ", ".join(text for text in negative if text)
    if involves_minors_sexually(asked, avoided):
        raise ToolboxError(ErrorCode.INVALID_PROMPT, MINOR_REFUSAL)
    refused = TermIndex((word, "refused", "server", False) for word in server_words)
    if refused and Reading(asked, refused).hits:
        raise ToolboxError(ErrorCode.INVALID_PROMPT, SERVER_REFUSAL)

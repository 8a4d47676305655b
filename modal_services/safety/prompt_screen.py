"""Prompt screening before any GPU work: the same check in the bot, the HTTP API, the CLI and the worker.

Two lists:

- Built in and always on: sexual content involving minors. A prompt is refused
  when it pairs a word for a minor with a sexual word, or uses a term that
  means that pairing by itself. Neither list alone refuses anything ("child"
  and "nude" are each fine in their own prompts), so the minor words can be
  plain and the sexual words broad.
- A server's own refused words and phrases (`/settings safety`).

What the negative prompt can do: it pushes the image away from its words.
Words there are avoided, never asked for, so "child" in a negative prompt
must not refuse an adult prompt. What it can add is the missing half of the
pairing by steering away from it: "adult, mature" negated on a sexual prompt,
or "clothes" negated on a prompt about a child, asks for the same thing as
spelling it out. Those two tricks are refused; a server's words only count in
the positive prompt (and the per-region prompts).

Matching works on words after folding case, accents, look-alike letters,
invisible characters and digit spellings (`l0l1` → `loli`), joins letters
spaced or dotted apart (`n u d e`, `n.u.d.e`) and pairs of split words
(`chi ld`), and lets repeated letters stand for one (`nuuude`). A refusal
never names the word that matched: the message says what kind of thing was
asked for, not how to get around the list.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable

from modal_services.errors import ErrorCode, ToolboxError

MINOR_REFUSAL = (
    "This prompt was refused: it asks for sexual content involving minors, which this bot never makes, "
    "on any server."
)
SERVER_REFUSAL = "This prompt uses words this server does not allow; please rephrase it."

# Words for a minor, and phrases (space-separated) that mean one.
MINOR_TERMS = (
    "child", "children", "childs", "kid", "kids", "kiddie", "kiddo", "minor", "minors", "underage", "preteen",
    "tween", "teen", "teenage", "teenager", "toddler", "infant", "newborn", "baby", "babies", "loli", "lolis",
    "lolita", "shota", "shotas", "schoolgirl", "schoolboy", "prepubescent", "pubescent", "juvenile", "youngster",
    "little girl", "little boy", "young girl", "young boy", "small girl", "small boy", "elementary school",
    "primary school", "middle school", "grade school", "kindergarten", "preschool", "preschooler",
    "grade schooler", "jailbait",
)
# Sexual words: nudity, sex acts, genitals, sexualised clothing and poses.
SEXUAL_TERMS = (
    "nsfw", "nude", "nudes", "nudity", "naked", "sex", "sexual", "sexy", "sexualized", "sexualised", "porn",
    "porno", "pornographic", "hentai", "erotic", "erotica", "lewd", "xxx", "r18", "nipple", "nipples", "areola",
    "areolae", "pussy", "vagina", "vulva", "labia", "clitoris", "penis", "cock", "dick", "testicles", "genital",
    "genitals", "genitalia", "breasts", "boobs", "tits", "cleavage", "topless", "bottomless",
    "undressed", "undressing", "striptease", "stripping", "lingerie", "underwear", "panties", "thong",
    "orgasm", "masturbate", "masturbating", "masturbation", "fellatio", "blowjob", "cunnilingus", "cum",
    "semen", "ejaculation", "intercourse", "rape", "molest", "molested", "seductive", "seduce", "bdsm",
    "bondage", "fetish", "ahegao", "spread legs", "no clothes", "without clothes", "pantyshot", "upskirt",
)
# Terms that mean the pairing by themselves.
MINOR_SEXUAL_TERMS = (
    "lolicon", "shotacon", "pedo", "pedophile", "pedophilia", "paedo", "paedophile", "paedophilia", "csam",
    "child porn", "childporn", "kiddie porn", "cp porn", "underage sex",
)
# In a negative prompt on a sexual prompt: steering away from adulthood.
ADULT_TERMS = (
    "adult", "adults", "mature", "mature body", "adult body", "adult woman", "adult man", "grown up", "grownup",
    "aged up",
)
# In a negative prompt on a prompt about a minor: steering away from being dressed.
CLOTHING_TERMS = (
    "clothes", "clothed", "clothing", "fully clothed", "dressed", "sfw", "safe for work", "censored",
)
# "12 year old", "12yo", "12 y/o", "twelve years old": a stated age under 18 is a minor term.
AGE_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
}
_AGE = re.compile(
    r"\b(\d{1,2}|" + "|".join(AGE_WORDS) + r")\s*[- ]?\s*(?:yo|y/o|y\.o\.?|yrs?\s*old|years?\s*-?\s*old|year-old)\b"
)

# Digits and symbols that stand in for letters.
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
                       "!": "i", "|": "l", "+": "t"})
# Cyrillic and Greek letters that look like Latin ones (what NFKC leaves alone).
_LOOKALIKES = str.maketrans({"а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i",
                             "ј": "j", "ѕ": "s", "к": "k", "м": "m", "т": "t", "н": "h", "в": "b", "ο": "o",
                             "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "τ": "t", "υ": "u"})
_WORD = re.compile(r"[a-z0-9]+")
# Words with the symbols that stand in for letters; punctuation around a word is not part of it.
_LEET_WORD = re.compile(r"[a-z0-9@$!|+]+")
_EDGE_PUNCTUATION = "!|+"
# Longest phrase in the lists, in words: how many neighbouring words are tried together.
_MAX_PHRASE = 3


def _fold(text: str) -> str:
    """Lower case, accents and invisible characters gone, look-alike letters as Latin ones."""
    text = unicodedata.normalize("NFKD", text.lower().translate(_LOOKALIKES))
    return "".join(char for char in text if not unicodedata.combining(char) and unicodedata.category(char) != "Cf")


def _squeeze(phrase: tuple[str, ...]) -> tuple[str, ...]:
    """A phrase with each run of one letter as one letter (`nuuude` → `nude`)."""
    return tuple(re.sub(r"(.)\1+", r"\1", word) for word in phrase)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


@dataclass(frozen=True)
class TermList:
    """Words and phrases, matched on whole words of a folded text."""

    terms: frozenset[tuple[str, ...]]
    squeezed: frozenset[tuple[str, ...]]

    @classmethod
    def of(cls, terms: Iterable[str]) -> "TermList":
        phrases = frozenset(tuple(_words(_fold(term))) for term in terms) - {()}
        return cls(phrases, frozenset(_squeeze(phrase) for phrase in phrases))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def found_in(self, text: "FoldedText") -> bool:
        # Squeezed forms are compared only for words that had repeated letters: "ten" is not "teen", "teeen" is.
        return not (self.terms.isdisjoint(text.phrases) and self.squeezed.isdisjoint(text.squeezed))


class FoldedText:
    """A prompt as the word sequences the lists are matched against."""

    def __init__(self, text: str):
        folded = _fold(text)
        self.stated_minor_age = any(
            (int(age) if age.isdigit() else AGE_WORDS[age]) < 18 for age in _AGE.findall(folded)
        )
        words = _words(folded)
        leet = [word.strip(_EDGE_PUNCTUATION).translate(_LEET) for word in _LEET_WORD.findall(folded)]
        leet = [word for word in leet if word]
        self.phrases: set[tuple[str, ...]] = set()
        for sequence in (words, leet):
            spelled_out, runs = _join_spelled_out(sequence)
            for variant in (sequence, spelled_out):
                self.phrases |= _phrases(variant)
                # Pairs of neighbouring words as one ("chi ld", "nu de").
                self.phrases |= {(first + second,) for first, second in zip(variant, variant[1:])}
            # Letters spelled out carry no word boundaries ("n u d e k i d"): every piece of them counts.
            self.phrases |= {(run[start:end],) for run in runs
                             for start in range(len(run)) for end in range(start + 1, len(run) + 1)}
        self.squeezed = {_squeeze(phrase) for phrase in self.phrases} - self.phrases


def _join_spelled_out(words: list[str]) -> tuple[list[str], list[str]]:
    """The words with each run of single letters as one word (`n u d e`, `n.u.d.e` → `nude`), and those runs."""
    joined: list[str] = []
    runs: list[str] = []
    run: list[str] = []
    for word in words + [""]:
        if len(word) == 1:
            run.append(word)
            continue
        if len(run) > 1:
            runs.append("".join(run))
        joined += ["".join(run)] if run else []
        run = []
        if word:
            joined.append(word)
    return joined, runs


def _phrases(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[start:start + length]) for length in range(1, _MAX_PHRASE + 1)
            for start in range(len(words) - length + 1)}


MINORS = TermList.of(MINOR_TERMS)
SEXUAL = TermList.of(SEXUAL_TERMS)
MINOR_SEXUAL = TermList.of(MINOR_SEXUAL_TERMS)
ADULTHOOD = TermList.of(ADULT_TERMS)
CLOTHING = TermList.of(CLOTHING_TERMS)


def involves_minors_sexually(positive: str, negative: str = "") -> bool:
    """The built-in rule: what the prompt asks for, with what its negative prompt steers away from."""
    asked, avoided = FoldedText(positive), FoldedText(negative)
    minor = MINORS.found_in(asked) or asked.stated_minor_age
    sexual = SEXUAL.found_in(asked)
    if MINOR_SEXUAL.found_in(asked) or (minor and sexual):
        return True
    return (sexual and ADULTHOOD.found_in(avoided)) or (minor and CLOTHING.found_in(avoided))


def screen_prompt(positive: Iterable[str], negative: Iterable[str] = (), server_words: Iterable[str] = ()) -> None:
    """Raises INVALID_PROMPT if the positive texts (a prompt, region prompts) with the negative ones break the
    built-in rule, or if a positive text uses one of the server's refused words or phrases."""
    asked = ", ".join(text for text in positive if text)
    avoided = ", ".join(text for text in negative if text)
    if involves_minors_sexually(asked, avoided):
        raise ToolboxError(ErrorCode.INVALID_PROMPT, MINOR_REFUSAL)
    refused = TermList.of(server_words)
    if refused and refused.found_in(FoldedText(asked)):
        raise ToolboxError(ErrorCode.INVALID_PROMPT, SERVER_REFUSAL)

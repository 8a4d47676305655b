"""Word lists compiled for fast matching: a dictionary lookup per word, phrase and joined piece of a prompt.

A `TermIndex` holds folded terms with what each one is (its kind, its languages, whether it pairs only within its
own language). It finds them in a sequence of words, however they were written: as whole words and phrases, split
in two or three pieces, spelled out letter by letter, with letters repeated, and run together in one token
(`nudechild`: a token made only of known words, counted when it holds a pairing by itself). Chinese and Japanese
terms are found inside the text, which has no spaces; Korean words carry particles (`아이들이`), read the same way
as run-together tokens.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from modal_services.safety import lexicon
from modal_services.safety.folding import fold

KINDS = ("minor", "sexual", "minor_sexual", "adult", "clothing", "content", "refused")
_BIT = {kind: 1 << position for position, kind in enumerate(KINDS)}
_MAX_PHRASE = 4
# Scripts without spaces between words (Han, hiragana): terms are searched inside the text.
_UNSPACED = re.compile(r"[\u3040-\u309f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Tokens: a run of one script, so `ロリ巨乳` is katakana `ロリ` then `巨乳`.
_TOKEN = re.compile(r"[\u30a0-\u30ff]+|[\uac00-\ud7af]+|[\u3040-\u309f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+"
                    r"|(?:(?![\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])[^\W_])+")
_READ_AS_PARTS = re.compile(r"[\u30a0-\u30ff\uac00-\ud7af]")  # katakana and Hangul words are read as parts
_BRACES = re.compile(r"\{([^}]*)\}")
_REPEATED = re.compile(r"(.)\1+")
_PARTS_CACHE_SIZE = 50_000
_END = ""  # the key of a trie node that ends a piece: what kinds the piece is


@dataclass(frozen=True)
class Hit:
    """One term found: its kind, its languages (None: any), and whether it pairs only within them."""

    kind: str
    languages: frozenset[str] | None
    strict: bool = False

    def pairs_with(self, other: "Hit") -> bool:
        if not (self.strict or other.strict) or self.languages is None or other.languages is None:
            return True
        return bool(self.languages & other.languages)


def tokens(folded: str) -> list[str]:
    return _TOKEN.findall(folded)


def _squeeze(text: str) -> str:
    """Each run of one letter as one letter (`nuuude` → `nude`)."""
    return _REPEATED.sub(r"\1", text)


def _expand(term: str) -> Iterator[str]:
    """`niñ{a,o}` → niña, niño; several groups give every combination."""
    pieces = _BRACES.split(term)
    choices = [piece.split(",") if odd else [piece] for odd, piece in zip(itertools.cycle((False, True)), pieces)]
    for combination in itertools.product(*choices):
        yield "".join(combination)


def _english_plurals(term: str) -> tuple[str, ...]:
    """"little girls", and the `z` of slang ("kidz")."""
    plural = term + ("es" if term.endswith(("s", "x", "z", "ch", "sh")) else "s")
    return (plural, term + "z") if " " not in term else (plural,)


class TermIndex:
    def __init__(self, entries: Iterable[tuple[str, str, str, bool]], glue: Iterable[str] = ()):
        """Entries are (term, kind, language, strict); glue words may join terms inside one token."""
        self.terms: dict[str, set[Hit]] = {}
        self.cjk_terms: dict[str, set[Hit]] = {}
        self.benign: set[tuple[str, ...]] = set()
        self.pieces: dict[str, int] = {fold(word): 0 for word in glue}
        grouped: dict[tuple[str, str, bool], set[str]] = {}
        for term, kind, language, strict in entries:
            grouped.setdefault((fold(term), kind, strict), set()).add(language)
        for (term, kind, strict), languages in grouped.items():
            self._add(term, Hit(kind, frozenset(languages), strict))
        self.squeezed = {_squeeze(key): hits for key, hits in self.terms.items()}
        self.longest_term = max(map(len, self.terms), default=0)
        # What a run of words can grow into: the start of a phrase ("little"), the start of a word split apart ("chi").
        keys = [*self.terms, *self.squeezed]
        self.phrase_prefixes = {" ".join(key.split()[:length])
                                for key in keys for length in range(1, key.count(" ") + 1)}
        self.join_prefixes = {key[:length] for key in keys if " " not in key for length in range(1, len(key))}
        self._parts_cache: dict[str, list[Hit]] = {}  # prompts reuse their words: each is cut once
        self.piece_trie: dict = {}
        for piece, kinds in self.pieces.items():
            node = self.piece_trie
            for char in piece:
                node = node.setdefault(char, {})
            node[_END] = kinds
        cjk = sorted(self.cjk_terms, key=len, reverse=True)
        self.cjk_pattern = re.compile("|".join(map(re.escape, cjk))) if cjk else None
        self.benign_lengths = sorted({len(phrase) for phrase in self.benign}, reverse=True)
        self.benign_starts = {phrase[0] for phrase in self.benign}

    def _add(self, term: str, hit: Hit) -> None:
        if _UNSPACED.search(term):
            self.cjk_terms.setdefault(term, set()).add(hit)
            return
        words = tuple(tokens(term))
        if not words:
            return
        if hit.kind == "benign":
            self.benign.add(words)
            return
        self.terms.setdefault(" ".join(words), set()).add(hit)
        joined = "".join(words)
        if len(words) > 1:  # "littlegirl" is "little girl"
            self.terms.setdefault(joined, set()).add(hit)
        self.pieces[joined] = self.pieces.get(joined, 0) | _BIT[hit.kind]

    def __bool__(self) -> bool:
        return bool(self.terms or self.cjk_terms)

    def cjk_hits(self, folded: str) -> list[Hit]:
        if not self.cjk_pattern:
            return []
        return [hit for match in self.cjk_pattern.finditer(folded) for hit in self.cjk_terms[match.group()]]

    def words_without_benign(self, words: list[str]) -> list[str]:
        """The words with each benign phrase ("baby blue") blanked, so none of its words count."""
        words = list(words)
        for start in range(len(words)):
            if words[start] not in self.benign_starts:
                continue
            for length in self.benign_lengths:
                if tuple(words[start:start + length]) in self.benign:
                    words[start:start + length] = [""] * length
                    break
        return words

    def is_exactly(self, words: list[str], kind: str) -> bool:
        """Whether these words are, all together, one term of this kind."""
        return any(hit.kind == kind for hit in self.terms.get(" ".join(words), ()))

    def sequence_hits(self, words: list[str], near: set[int] | None = None) -> list[Hit]:
        """Terms in a sequence of words, as whole words and phrases and as the pieces of split words; with `near`,
        only those that hold one of the words at those positions."""
        runs = _spelled_out_runs(words)
        candidates = self._phrases_and_joins(words, near) | {
            run[start:end] for run in runs for start in range(len(run))
            for end in range(start + 1, min(len(run), start + self.longest_term) + 1)}
        hits = [hit for candidate in candidates for hit in self.terms.get(candidate, ())]
        # Squeezed forms count only where a word had repeated letters: "ten" is not "teen", "teeen" is.
        squeezed = [_squeeze(word) if _REPEATED.search(word) else word for word in words]
        repeated = {position for position, word in enumerate(words) if squeezed[position] != word}
        if repeated:
            hits += [hit for candidate in self._phrases_and_joins(squeezed, repeated)
                     for hit in self.squeezed.get(candidate, ())]
        for position, word in enumerate(words + runs):
            if (near is None or position in near or position >= len(words)) and word not in self.terms \
                    and (len(word) > 3 or _READ_AS_PARTS.search(word)):
                hits += self._parts_hits(word)
        return hits

    def _phrases_and_joins(self, words: list[str], near: set[int] | None = None) -> set[str]:
        """Runs of up to four words as phrases, and joined as one word ("chi ld", "lit tle gi rl"), where they can
        still become a term; with `near`, only the runs that hold a word at one of those positions."""
        found = set(words) if near is None else {words[position] for position in near}
        found.discard("")
        starts = range(len(words)) if near is None else sorted(
            {start for position in near for start in range(max(0, position - _MAX_PHRASE + 1), position + 1)})
        for start in starts:
            phrase = joined = words[start]
            if phrase not in self.phrase_prefixes and joined not in self.join_prefixes:
                continue  # most words start no longer term
            reaches_near = near is None or start in near
            for end in range(start + 1, min(start + _MAX_PHRASE, len(words))):
                if not words[end] or not (phrase in self.phrase_prefixes or joined in self.join_prefixes):
                    break
                phrase, joined = f"{phrase} {words[end]}", joined + words[end]
                reaches_near = reaches_near or end in near
                if reaches_near:
                    found.update((phrase, joined))
        return found

    def _parts_hits(self, word: str) -> list[Hit]:
        """A token made only of known words: a Korean word and its particles, katakana words written together,
        or a minor word and a sexual word run together (which counts only as the pairing, never as one half)."""
        if word not in self._parts_cache:
            if len(self._parts_cache) > _PARTS_CACHE_SIZE:
                self._parts_cache.clear()
            mask = self._parts_mask(word)
            if _READ_AS_PARTS.search(word):
                hits = [Hit(kind, None) for kind in KINDS if mask & _BIT[kind]]
            else:
                pairing = mask & _BIT["minor_sexual"] or (mask & _BIT["minor"] and mask & _BIT["sexual"])
                hits = [Hit("minor_sexual", None)] if pairing else []
            self._parts_cache[word] = hits
        return self._parts_cache[word]

    def _parts_mask(self, word: str) -> int:
        """The kinds of the pieces of every way to cut `word` wholly into known pieces (0 if there is none)."""
        reach = {0: 0}
        for start in range(len(word)):
            if start not in reach:
                continue
            node = self.piece_trie
            for end in range(start, len(word)):
                node = node.get(word[end])
                if node is None:
                    break
                if _END in node:
                    reach[end + 1] = reach.get(end + 1, 0) | reach[start] | node[_END]
        return reach.get(len(word), 0)


def _spelled_out_runs(words: list[str]) -> list[str]:
    """Runs of single letters joined (`n u d e` → `nude`): letters spelled out carry no word boundaries."""
    runs = []
    for single, group in itertools.groupby(words, key=lambda word: len(word) == 1):
        letters = list(group)
        if single and len(letters) > 1:
            runs.append("".join(letters))
    return runs


def _lexicon_entries() -> Iterator[tuple[str, str, str, bool]]:
    for language, lists in lexicon.LEXICON.items():
        for kind, text in lists.items():
            if kind == "numbers":
                continue
            for raw in lexicon.terms(text):
                strict = raw.startswith("~")
                for term in _expand(raw.lstrip("~")):
                    yield term, kind, language, strict
                    if language == "en" and kind in ("minor", "sexual") and term.replace(" ", "").isalpha():
                        for plural in _english_plurals(term):
                            yield plural, kind, language, strict


@functools.cache
def builtin_index() -> TermIndex:
    return TermIndex(_lexicon_entries(), glue=lexicon.terms(lexicon.GLUE))

"""The text a job's text encoders read, built in one place for the engines and for prompt screening.

The engines prepend each LoRA's trigger words to the prompt (`with_trigger_words`),
and the request's screening reads that same joined text, so a trigger word
counts exactly as a word typed into the prompt.

The SDXL engine reads A1111's weighting syntax and BREAK (`prompt_syntax.py`):
`(word:1.2)` reaches the encoders as `word`, weighted, and Flux reads the same
words without weights. So the screen reads a prompt as the model will (the
syntax removed, BREAK's chunks joined), and as written, and with every other
form people write removed too (`<lora:name:0.8>`, `{word}`): the brackets and
numbers split the words the screen matches (`(chi:1.1)ld`, `(nude)(kid)`).
`readings` gives each of them, so a pairing visible in any of them is found.
"""

from __future__ import annotations

import re
from typing import Iterable, Protocol

from modal_services.jobs.prompt_syntax import plain_text


class HasTriggerWords(Protocol):
    trigger_words: Iterable[str]


def with_trigger_words(prompt: str, loras: Iterable[HasTriggerWords]) -> str:
    """Prepend each LoRA's trigger words once; words already in the prompt are not repeated."""
    added: list[str] = []
    for lora in loras:
        for word in (word.strip() for word in lora.trigger_words):
            pattern = r"(?<![\w])" + re.escape(word) + r"(?![\w])"
            if not word or re.search(pattern, prompt, re.IGNORECASE) or any(word.lower() == seen.lower() for seen in added):
                continue
            added.append(word)
    return ", ".join(added + ([prompt] if prompt else []))


# `<lora:name:0.8>`, `<lyco:name>`, `<hypernet:name:1>`: the name stays, it is text the encoder reads here.
_EXTRA_NETWORK = re.compile(r"<\s*(?:lora|lyco|hypernet)\s*:\s*([^:>]*)(?::[^>]*)?>", re.IGNORECASE)
# The weight of `(words:1.2)` or `[words:0.5]`, and a bare weight left by nesting.
_WEIGHT = re.compile(r":\s*-?\d*\.?\d+\s*(?=[)\]])")
# Emphasis brackets, and the backslashes that escape literal ones.
_BRACKETS = re.compile(r"[()\[\]{}\\]")


def without_weighting(text: str, between: str = "") -> str:
    """`text` with A1111's weighting and extra-network forms removed, each bracket replaced by `between`:
    `(chi:1.1)ld` → `child`; with a space, `(nude)(kid)` → ` nude  kid `."""
    text = _EXTRA_NETWORK.sub(r" \1 ", text)
    text = _WEIGHT.sub("", text)
    return _BRACKETS.sub(between, text)


def readings(texts: Iterable[str]) -> list[str]:
    """Each text as written, as the model reads it, and without any weighting form (pieces joined, and apart),
    each once."""
    read: list[str] = []
    for text in texts:
        read += dict.fromkeys([text, plain_text(text), without_weighting(text), without_weighting(text, " ")])
    return read

"""Text folded to the form the prompt screen matches: one spelling for the many ways a word can be written.

Folding removes what changes how a word looks but not what it says: case, accents (but the ñ), invisible characters,
weights
(`(adult:1.4)`), compatibility forms (fullwidth, circled, mathematical letters: Unicode's NFKC), and look-alike
letters from other scripts (Cyrillic `а`, Greek `ο`, small capitals `ᴋ`), which become the Latin letter they imitate.
Both the prompt and the word lists are folded the same way, so a Russian word still matches itself (its look-alike
letters turn Latin on both sides) and a Latin word spelled with Cyrillic letters matches the Latin one.
"""

from __future__ import annotations

import re
import unicodedata

# Look-alikes that NFKC leaves alone, from Unicode's confusables for the scripts that matter here (Cyrillic, Greek,
# IPA and small capitals, Armenian, Coptic) and Latin letters with a stroke that NFD does not split.
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y",
    "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "һ": "h", "ү": "y",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "ϲ": "c", "ω": "w", "γ": "y",
    # Small capitals and IPA letters
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ꜰ": "f", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k",
    "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w",
    "ʏ": "y", "ᴢ": "z", "ɑ": "a", "ɡ": "g", "ɩ": "i", "Ɩ": "l", "ɫ": "l", "ƚ": "l", "ɭ": "l", "ɦ": "h", "ʋ": "v",
    "ȷ": "j", "ƙ": "k", "ɗ": "d", "ƈ": "c", "ƥ": "p", "ɓ": "b", "ʂ": "s", "ʐ": "z", "ƴ": "y", "ɲ": "n", "ŋ": "n",
    "ɱ": "m",
    # Latin letters with a stroke, and the dotless i
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t", "ƀ": "b", "ǥ": "g", "ɨ": "i",
    # Armenian, Coptic, Tai Le
    "ս": "u", "օ": "o", "ց": "g", "հ": "h", "ո": "n", "զ": "q", "ⲁ": "a", "ⲉ": "e", "ⲓ": "i", "ⲕ": "k", "ⲟ": "o",
    "ⲣ": "p", "ⲥ": "c", "ⲭ": "x", "ⲩ": "y", "ᥱ": "e",
})
# Accents and other combining marks on letters (kana's voicing marks are not among them), and invisible characters.
_MARKS_AND_INVISIBLES = re.compile(
    "[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u206a-\u206f\ufeff]"
)
# "(word:1.3)" and "[word:0.8]": the weight is not part of the prompt the encoders read.
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?(?=\s*[)\]>])")

# Digits and symbols that stand in for letters (`l0l1`, `$3xy`).
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
                      "!": "i", "|": "l", "+": "t"})


def fold(text: str) -> str:
    """The text as the screen reads it: see the module's docstring."""
    text = unicodedata.normalize("NFKD", _WEIGHT.sub("", text).translate(_CONFUSABLES))
    # The tilde of ñ is kept: Spanish "niña" is not the name "Nina".
    text = text.replace("n\u0303", "ñ").replace("N\u0303", "Ñ")
    text = unicodedata.normalize("NFC", _MARKS_AND_INVISIBLES.sub("", text))
    return text.casefold().translate(_CONFUSABLES)

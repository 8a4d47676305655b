"""A1111's generation text (its `parameters` PNG chunk and EXIF UserComment), written and read.

The format, as A1111's `create_infotext` writes it and `parse_generation_parameters`
reads it: the prompt, then `Negative prompt: ...` (absent when empty), then
one line of `Key: value` pairs joined by ", ", where a value holding a comma,
a colon or a newline is JSON-quoted. The last line counts as settings only
when at least three pairs are found on it. LoRAs appear in the prompt as
`<lora:name:weight>` and their short hashes as `Lora hashes: "name: hash, ..."`.
Sampler and schedule are two fields (`Sampler: DPM++ 2M, Schedule type: Karras`).

The reader uses A1111's pair pattern with the key bounded to 64 characters,
which keeps a hostile line from taking quadratic time.
"""

from __future__ import annotations

import json
import re
from typing import Any

from modal_services.image_info.settings import GenerationSettings, LoraUse, as_float

# A1111's `re_param`, its key bounded (A1111's own: `\w[\w \-/]+`).
PARAM = re.compile(r'\s*(\w[\w \-/]{1,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE_PREFIX = "Negative prompt:"
# `<lora:name:weight>` and A1111's longer forms (`<lora:name:te:unet>`, `<lyco:...>`): the first weight counts.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)
# A1111's schedule types, which older versions wrote at the end of the sampler's name.
SCHEDULE_TYPES = ("Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps",
                  "Simple", "Normal", "Uniform", "Beta")
AUTOMATIC_SCHEDULE = "Automatic"
# The schedule A1111 (1.9 on) runs a sampler with when its Schedule type is "Automatic"; a sampler not named
# here runs on its plain one.
AUTOMATIC_SCHEDULES = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2S a": "Karras",
                       "DPM++ 2M SDE": "Exponential", "DPM++ 3M SDE": "Exponential"}
# A settings line longer than this is not A1111's (its real lines are a few kilobytes at most).
MAX_SETTINGS_LINE = 64 * 1024
# The fields that become the settings' own; every other pair is kept in `other`.
KNOWN_FIELDS = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                "Denoising strength", "Lora hashes")


# ------------------------------------------------------------------ names


def lora_alias(name: str) -> str:
    """A LoRA's name as A1111 writes it in `Lora hashes` and `<lora:...>`: without `:`, `,`, `<` and `>`."""
    return re.sub(r"[:,<>]", "", name).strip()


def split_sampler(name: str) -> tuple[str, str | None]:
    """("DPM++ 2M", "Karras") from "DPM++ 2M Karras"; a name without a schedule type is (name, None)."""
    for schedule in SCHEDULE_TYPES:
        if name.endswith(" " + schedule):
            return name[: -len(schedule) - 1], schedule
    return name, None


def joined_sampler(sampler: str | None, schedule: str | None) -> str | None:
    """The sampler's name with its schedule type, as people name it ("DPM++ 2M Karras"); "Automatic" is the
    schedule A1111 picks for that sampler."""
    if not sampler:
        return None
    if schedule == AUTOMATIC_SCHEDULE:
        schedule = AUTOMATIC_SCHEDULES.get(sampler)
    if not schedule:
        return sampler
    return f"{sampler} {schedule}"


# ------------------------------------------------------------------ writing


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, a colon or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(ch in text for ch in ",:\n") else text


def infotext(prompt: str, negative_prompt: str, fields: dict[str, Any]) -> str:
    """The generation text: `fields` (in A1111's order, None left out) on the last line."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def lora_tags(loras: list[tuple[str, float]]) -> str:
    """`<lora:name:weight>` for each (name, weight), as A1111 prompts carry them."""
    return " ".join(f"<lora:{lora_alias(name)}:{weight:g}>" for name, weight in loras)


# ------------------------------------------------------------------ reading


def parse_infotext(text: str, source: str = "A1111/Forge") -> GenerationSettings:
    """The settings A1111's text gives; a text without a settings line is all prompt, as A1111 reads it."""
    *lines, last = text.strip().split("\n")
    if len(last) > MAX_SETTINGS_LINE or len(PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative = _prompts(lines)
    pairs = _pairs(last)
    prompt, tagged = without_lora_tags(prompt)
    width, height = size_of(pairs.get("Size", ""))
    return GenerationSettings(
        source=source, prompt=prompt, negative_prompt=negative, steps=pairs.get("Steps"),
        sampler=joined_sampler(pairs.get("Sampler"), pairs.get("Schedule type")), cfg=pairs.get("CFG scale"),
        seed=pairs.get("Seed"), width=width, height=height, model=pairs.get("Model"),
        model_hash=pairs.get("Model hash"), denoising_strength=pairs.get("Denoising strength"),
        loras=_loras(tagged, _lora_hashes(pairs.get("Lora hashes", ""))),
        other={key: value for key, value in pairs.items() if key not in KNOWN_FIELDS},
    )


def _prompts(lines: list[str]) -> tuple[str, str]:
    """(prompt, negative prompt): lines after the one starting `Negative prompt:` are the negative's."""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative)


def _pairs(line: str) -> dict[str, str]:
    """The settings line's pairs, quoted values unquoted (a later pair of the same key wins, as in A1111)."""
    pairs = {}
    for key, value in PARAM.findall(line):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        pairs[key.strip()] = str(value).strip()
    return pairs


def size_of(text: str) -> tuple[str | None, str | None]:
    match = SIZE.match(text)
    return (match.group(1), match.group(2)) if match else (None, None)


def _lora_hashes(text: str) -> dict[str, str]:
    """`name: hash, name2: hash2` → {name: hash}."""
    hashes = {}
    for part in text.split(","):
        name, colon, short_hash = part.partition(":")
        if colon and name.strip() and short_hash.strip():
            hashes[name.strip()] = short_hash.strip()
    return hashes


def without_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float | None]]]:
    """The prompt without its `<lora:...>` tags (the separators they leave tidied), and (name, weight) of each."""
    matches = list(LORA_TAG.finditer(prompt))
    if not matches:
        return prompt, []
    ends = [0] + [match.end() for match in matches]
    starts = [match.start() for match in matches] + [len(prompt)]
    text = ""
    for piece in (prompt[start:end].strip(" \t") for start, end in zip(ends, starts)):
        if text.endswith(",") and piece.startswith(","):
            piece = piece[1:].lstrip(" \t")  # "a, <lora:x:1>, b" → "a, b"
        if piece:
            text = f"{text} {piece}" if text else piece
    return text.strip(" \t\n,"), [(match.group(1).strip(), as_float(match.group(2))) for match in matches]


def _loras(tagged: list[tuple[str, float | None]], hashes: dict[str, str]) -> list[LoraUse]:
    """A LoRA per prompt tag, with its hash; then those only `Lora hashes` names."""
    loras = [LoraUse(name, weight, hashes.get(name)) for name, weight in tagged]
    named = {lora.name for lora in loras}
    return loras + [LoraUse(name, None, short_hash) for name, short_hash in hashes.items() if name not in named]

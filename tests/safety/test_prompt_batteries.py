"""The prompt screen against its batteries: how much it refuses of what it must, and of what is benign.

`python -m tests.safety.battery_report` prints the same figures as tables (they are in the README).
"""

from __future__ import annotations

import time

import pytest

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.safety.prompt_screen import MINOR_REFUSAL, involves_minors_sexually, screen_prompt
from tests.safety.battery_report import PARTS, counts, load

LANGUAGES = {"en", "es", "pt", "fr", "de", "ru", "ja", "ko", "zh", "it", "pl", "tr"}
# At least what the screen reached when these figures were last measured (README, "What the prompt screen
# catches"); the held-out part was not read while tuning.
MIN_REFUSED = {"tuning": 1.0, "held-out": 0.98}
MAX_BENIGN_REFUSED = {"tuning": 0.0, "held-out": 0.02}


@pytest.mark.parametrize("part", PARTS)
def test_what_must_be_refused_is(part):
    refused = counts(load("refuse", part), "category")["all"]
    assert refused.rate >= MIN_REFUSED[part], f"{part}: {refused} refused"


@pytest.mark.parametrize("part", PARTS)
def test_benign_prompts_that_share_words_pass(part):
    refused = counts(load("benign", part), "category")["all"]
    assert refused.rate <= MAX_BENIGN_REFUSED[part], f"{part}: {refused} benign prompts refused"


def test_every_language_is_screened():
    lines = load("refuse", "tuning") + load("refuse", "held-out")
    by_language = counts(lines, "language")
    assert set(by_language) - {"all"} == LANGUAGES
    weak = {language: str(count) for language, count in by_language.items() if count.rate < 0.95}
    assert not weak, weak


def test_the_batteries_are_what_the_readme_says():
    for kind, least in (("refuse", 400), ("benign", 200)):
        tuning, held_out = load(kind, "tuning"), load(kind, "held-out")
        assert len(tuning) + len(held_out) >= least
        assert abs(len(held_out) / (len(tuning) + len(held_out)) - 0.25) < 0.01  # every fourth line
        assert {line.language for line in tuning + held_out} == LANGUAGES


def test_a_refusal_never_names_what_matched():
    for line in load("refuse", "tuning")[::10]:
        with pytest.raises(ToolboxError) as caught:
            screen_prompt([line.prompt], [line.negative] if line.negative else [])
        assert caught.value.code is ErrorCode.INVALID_PROMPT and caught.value.message == MINOR_REFUSAL


@pytest.mark.parametrize("prompt", [
    "n u d e " * 250,  # letters spelled out: every piece of the run is tried
    "chi ld " * 285,
    "12 " * 666,
    "ロリ" * 1000,
])
def test_long_hostile_prompts_stay_cheap(prompt):
    started = time.perf_counter()
    involves_minors_sexually(prompt[:2000], prompt[:2000])
    assert time.perf_counter() - started < 2.0

"""A1111's prompt syntax and long prompts on SDXL, on the tiny text encoders; Flux's prompt handling.

Each expected embedding is computed here from the plain encoders' hidden states, by A1111's rules: 75-token
chunks wrapped in start/end tokens and joined along the sequence, weights multiplied in and the chunk's mean
restored, the pooled embedding from the first chunk. The tiny tokenizer reads one token per character
(except `cat` and `at`), so a prompt's length in characters is about its length in tokens.
"""

from __future__ import annotations

import pytest
import torch

from modal_services.engines.flux import MAX_SEQUENCE_LENGTH, FluxEngine, flux_prompt
from modal_services.engines.sdxl import generate as generate_module
from modal_services.engines.sdxl.prompt_encoding import (
    CHUNK_LENGTH,
    SdxlPromptEncoder,
    TextConditioning,
    token_chunks,
)
from modal_services.jobs.prompt_syntax import Run, parse_attention, plain_text
from modal_services.jobs.requests import FluxGenerateRequest, GenerateRequest
from modal_services.layout import Layout
from tests.engines.test_generate_engine import engine, generate, pixels, volume  # noqa: F401 (fixtures)
from tests.fixtures.tiny_flux import build_tiny_flux_volume, tiny_t5_tokenizer
from tests.fixtures.tiny_sdxl import tiny_sdxl_components

# 56 tags of two to four tokens and their commas: 199 tokens, three chunks.
TAGS = ["cat", "dog", "red", "sky", "sea"] * 11 + ["cat"]
LONG_PROMPT = ", ".join(TAGS)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionXLPipeline

    components = tiny_sdxl_components()
    components.pop("controlnet")
    return StableDiffusionXLPipeline(**components)


@pytest.fixture(scope="module")
def encoder(pipe):
    return SdxlPromptEncoder(pipe)


def encode(encoder, prompt: str):
    with torch.inference_mode():
        return encoder.encode(prompt)


def plain_hidden_states(pipe, ids_per_encoder: list[list[int]]):
    """Each encoder's penultimate hidden states for its 77 ids, joined: (1, 77, 80); and the pooled embedding."""
    states = []
    with torch.inference_mode():
        for ids, text_encoder in zip(ids_per_encoder, (pipe.text_encoder, pipe.text_encoder_2)):
            output = text_encoder(torch.tensor([ids]), output_hidden_states=True)
            states.append(output.hidden_states[-2])
    return states, output.text_embeds


def chunk_ids(tokenizer, text: str) -> list[int]:
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (CHUNK_LENGTH - len(ids))


def a1111_weighted(hidden, weights):
    """A1111's "Original" emphasis on one chunk: z * w, then z * (mean before / mean after)."""
    weighted = hidden * weights[:, None]
    return weighted * (hidden.mean() / weighted.mean())


# ---------------------------------------------------------------- the syntax, by A1111's rules


def test_the_attention_syntax_parses_as_a1111_parses_it():
    # A1111's own examples and results, to the last digit (parse_prompt_attention's doctests).
    assert parse_attention("normal text") == [[Run("normal text", 1.0)]]
    assert parse_attention("an (important) word") == [[Run("an ", 1.0), Run("important", 1.1), Run(" word", 1.0)]]
    assert parse_attention("(unbalanced") == [[Run("unbalanced", 1.1)]]
    assert parse_attention(r"\(literal\]") == [[Run("(literal]", 1.0)]]
    assert parse_attention("(unnecessary)(parens)") == [[Run("unnecessaryparens", 1.1)]]
    assert parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [[
        Run("a ", 1.0), Run("house", 1.5730000000000004), Run(" ", 1.1), Run("on", 1.0), Run(" a ", 1.1),
        Run("hill", 0.55), Run(", sun, ", 1.1), Run("sky", 1.4641000000000006), Run(".", 1.1),
    ]]
    assert parse_attention("[[blurry]], (tag:1.5)") == [[Run("blurry", 1 / 1.1 / 1.1), Run(", ", 1.0), Run("tag", 1.5)]]
    assert parse_attention(r"hatsune miku \(vocaloid\)") == [[Run("hatsune miku (vocaloid)", 1.0)]]


def test_break_is_the_capitalised_word_only_and_splits_segments():
    assert parse_attention("a cat BREAK a dog") == [[Run("a cat", 1.0)], [Run("a dog", 1.0)]]
    assert parse_attention("a cat break a dog, BREAKfast") == [[Run("a cat break a dog, BREAKfast", 1.0)]]
    # Inside brackets too (A1111 would read the word "BREAK" at weight -1.1 there).
    assert parse_attention("(a BREAK b:1.5)") == [[Run("a", 1.5)], [Run("b", 1.5)]]


def test_the_plain_text_is_the_words_without_the_syntax():
    assert plain_text("(masterpiece:1.2), [blurry], ((cat)) BREAK a dog") == "masterpiece, blurry, cat a dog"
    assert plain_text(r"miku \(vocaloid\)") == "miku (vocaloid)"
    assert plain_text("a fox") == "a fox"


# ---------------------------------------------------------------- chunks


def test_a_long_prompt_is_cut_into_chunks_of_75_at_a_comma(pipe):
    chunks = token_chunks(LONG_PROMPT, pipe.tokenizer)
    tokens = pipe.tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
    # The 76th token starts a tag and the first chunk's last comma is one token back: the chunk ends at the
    # comma, and the tag starts the second.
    assert len(tokens) == 199 and [len(chunk.ids) for chunk in chunks] == [74, 75, 50]
    assert pipe.tokenizer.convert_ids_to_tokens(chunks[0].ids[-1]) == ",</w>"
    assert sum((chunk.ids for chunk in chunks), []) == tokens
    # A tag that would straddle the 75th token moves whole into the next chunk (the comma stays behind).
    straddling = ", ".join(["cat"] * 36 + ["zebra"])
    first, second = token_chunks(straddling, pipe.tokenizer)
    assert pipe.tokenizer.decode(second.ids) == "zebra" and len(first.ids) == 72


def test_break_starts_a_chunk(pipe):
    chunks = token_chunks("a cat BREAK a dog BREAK", pipe.tokenizer)
    assert [pipe.tokenizer.decode(chunk.ids) for chunk in chunks] == ["a cat", "a dog"]
    assert [chunk.ids for chunk in token_chunks("BREAK a dog", pipe.tokenizer)][0] == []


def test_trigger_words_are_read_once_in_the_first_chunk(pipe):
    request = GenerateRequest.parse({"prompt": LONG_PROMPT, "loras": [
        {"name": "style", "file": "style.safetensors", "trigger_words": ["zebra", "cat"]}]})
    first, *rest = token_chunks(request.encoder_prompt(), pipe.tokenizer)
    assert pipe.tokenizer.decode(first.ids).replace(" ", "").startswith("zebra,cat,dog,")
    assert all("zebra" not in pipe.tokenizer.decode(chunk.ids).replace(" ", "") for chunk in rest)


# ---------------------------------------------------------------- embeddings


def test_a_short_prompt_without_syntax_is_diffusers_encoding_bit_for_bit(pipe, encoder):
    with torch.inference_mode():
        for prompt, negative in [("a cat, sitting", "blurry"), ("a cat", ""), ("a cat", None)]:
            expected = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=True, negative_prompt=negative or None)
            (got,) = encoder.conditioning([prompt], negative or "", guided=True)
            assert all(torch.equal(a, b) for a, b in zip(expected, got))
        (unguided,) = encoder.conditioning(["a cat"], "blurry", guided=False)
        assert unguided.negative_embeds is None and "negative_prompt_embeds" not in unguided.pipeline_arguments()


def test_a_weight_scales_the_tokens_and_the_chunk_keeps_its_mean(pipe, encoder):
    got = encode(encoder, "a cat, (red:1.5), [dog]")
    plain = "a cat, red, dog"
    states, pooled = plain_hidden_states(pipe, [chunk_ids(pipe.tokenizer, plain), chunk_ids(pipe.tokenizer_2, plain)])
    # Tokens: start, "a", "cat", ",", "r", "e", "d", ",", "d", "o", "g", end: red is 4-6, dog 8-10.
    assert pipe.tokenizer.convert_ids_to_tokens(chunk_ids(pipe.tokenizer, plain)[4:11]) == [
        "r", "e", "d</w>", ",</w>", "d", "o", "g</w>"]
    weights = torch.ones(CHUNK_LENGTH)
    weights[4:7] = 1.5
    weights[8:11] = 1 / 1.1
    expected = torch.cat([a1111_weighted(state, weights) for state in states], dim=-1)
    torch.testing.assert_close(got.embeds, expected, rtol=0, atol=1e-6)
    # The pooled embedding is the unweighted one.
    assert torch.equal(got.pooled, pooled)


def test_break_chunks_are_joined_along_the_sequence_with_the_first_chunks_pooling(encoder):
    got = encode(encoder, "a cat BREAK a dog")
    cat, dog = encode(encoder, "a cat"), encode(encoder, "a dog")
    assert got.embeds.shape == (1, 2 * CHUNK_LENGTH, 80)
    assert torch.equal(got.embeds, torch.cat([cat.embeds, dog.embeds], dim=1))
    assert torch.equal(got.pooled, cat.pooled)


def test_a_200_token_prompt_reaches_the_encoders_to_its_last_tag(pipe, encoder):
    changed = LONG_PROMPT[: -len(TAGS[-1])] + "fox"
    long, other = encode(encoder, LONG_PROMPT), encode(encoder, changed)
    assert long.embeds.shape == (1, 3 * CHUNK_LENGTH, 80)
    # The first two chunks are the same; the third, where the last tag is, differs.
    assert torch.equal(long.embeds[:, : 2 * CHUNK_LENGTH], other.embeds[:, : 2 * CHUNK_LENGTH])
    assert not torch.equal(long.embeds[:, 2 * CHUNK_LENGTH :], other.embeds[:, 2 * CHUNK_LENGTH :])
    # diffusers' own encoding cuts both at 77 tokens: the two are one prompt to it.
    with torch.inference_mode():
        cut = [pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)[0] for text in (LONG_PROMPT, changed)]
    assert torch.equal(*cut)


def test_the_negative_prompt_is_padded_with_empty_prompt_chunks(encoder):
    with torch.inference_mode():
        (text,) = encoder.conditioning([LONG_PROMPT], "blurry", guided=True)
        (zeroed,) = encoder.conditioning([LONG_PROMPT], "", guided=True)
        (short,) = encoder.conditioning(["a cat"], "blurry BREAK ugly", guided=True)
    blurry, empty = encode(encoder, "blurry"), encode(encoder, "")
    assert torch.equal(text.negative_embeds, torch.cat([blurry.embeds, empty.embeds, empty.embeds], dim=1))
    assert torch.equal(text.negative_pooled, blurry.pooled)
    assert not zeroed.negative_embeds.any() and zeroed.negative_embeds.shape == text.embeds.shape
    # The shorter of the two is padded, whichever it is.
    assert torch.equal(short.embeds, torch.cat([encode(encoder, "a cat").embeds, empty.embeds], dim=1))


def test_tiles_of_different_lengths_are_padded_to_one(encoder):
    with torch.inference_mode():
        texts = encoder.conditioning(["a cat", LONG_PROMPT, "a cat"], "", guided=False)
    assert [text.embeds.shape[1] for text in texts] == [3 * CHUNK_LENGTH] * 3
    assert torch.equal(texts[0].embeds, texts[2].embeds)


# ---------------------------------------------------------------- the images


class DiffusersEncoding:
    """The encoding before this one: diffusers' own `encode_prompt` (77 tokens, no syntax)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def conditioning(self, prompts, negative, guided):
        return [TextConditioning(*self.pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative or None)) for prompt in prompts]


FAST = dict(width=512, height=512, steps=20, seed=5, timeout=300)


@pytest.mark.slow
def test_a_short_prompt_gives_todays_pixels(engine, monkeypatch):  # noqa: F811
    request = {**FAST, "prompt": "a cat, sitting", "negative_prompt": "blurry", "cfg": 5.5}
    now = generate(engine, **request)
    monkeypatch.setattr(generate_module, "SdxlPromptEncoder", DiffusersEncoding)
    before = generate(engine, **request)
    assert (pixels(now["images"][0]) == pixels(before["images"][0])).all()


@pytest.mark.slow
def test_the_last_tag_of_a_200_token_prompt_changes_the_image(engine, monkeypatch):  # noqa: F811
    prompts = [LONG_PROMPT, LONG_PROMPT[: -len(TAGS[-1])] + "fox"]
    images = [pixels(generate(engine, **FAST, cfg=1.0, prompt=prompt)["images"][0]) for prompt in prompts]
    assert (images[0] != images[1]).any()
    # Cut at 77 tokens, as before, the two prompts gave one image.
    monkeypatch.setattr(generate_module, "SdxlPromptEncoder", DiffusersEncoding)
    images = [pixels(generate(engine, **FAST, cfg=1.0, prompt=prompt)["images"][0]) for prompt in prompts]
    assert (images[0] == images[1]).all()


# ---------------------------------------------------------------- Flux


def test_flux_reads_the_words_without_weights_and_says_so():
    tokenizer = tiny_t5_tokenizer()
    assert flux_prompt("a red cat", tokenizer) == ("a red cat", [])
    text, (note,) = flux_prompt("(a red cat:1.2) BREAK [blue dog]", tokenizer)
    assert text == "a red cat blue dog" and note.startswith("Flux does not use prompt weights or BREAK")


def test_a_prompt_past_t5s_512_tokens_says_where_it_was_cut():
    tokenizer = tiny_t5_tokenizer()
    prompt = "a cat " * 200 + "zebra " * 60  # 400 tokens of cats, then 6 tokens per zebra: cut in the 19th
    text, (note,) = flux_prompt(prompt, tokenizer)
    assert text == prompt
    # What the pipeline's T5 call reads: 511 tokens and the end token.
    read = tokenizer(text, max_length=MAX_SEQUENCE_LENGTH, truncation=True).input_ids
    assert read[:-1] == tokenizer(prompt[:1310]).input_ids[:-1] and prompt[1300:1310] == "a zebra ze"
    assert note == ("The prompt is longer than the 512 tokens Flux reads: it was read up to “…a zebra zebra zebra "
                    "zebra zebra zebra ze”, and from “bra zebra zebra zebra zebra zebra zebra…” on it was left out.")
    assert flux_prompt("a cat " * 200, tokenizer)[1] == []


def test_flux_generates_from_the_plain_words_and_the_result_says_so(tmp_path):
    flux_volume = build_tiny_flux_volume(tmp_path)
    flux = FluxEngine(Layout(flux_volume.models_dir, flux_volume.loras_dir))
    flux.load()
    results = [flux.generate(FluxGenerateRequest.parse({**FAST, "prompt": prompt}), lambda fraction, stage: None)
               for prompt in ("(a cat:1.2) BREAK [red]", "a cat red")]
    assert results[0]["prompt"] == "a cat red" and len(results[0]["notes"]) == 1 and results[1]["notes"] == []
    assert (pixels(results[0]["images"][0]) == pixels(results[1]["images"][0])).all()

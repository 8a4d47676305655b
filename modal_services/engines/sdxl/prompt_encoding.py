"""SDXL prompts encoded as A1111 encodes them: any length, with attention weights and BREAK.

diffusers' own `encode_prompt` cuts a prompt at CLIP's 77 tokens and reads
`(word:1.2)` as characters. Here, on each of SDXL's two text encoders, as
A1111's `sd_hijack_clip.py` does:

- the prompt is parsed (`modal_services.jobs.prompt_syntax`) and each run of
  text tokenized on its own, then packed into chunks of 75 tokens; when a
  chunk fills up and its last comma is at most 20 tokens back (A1111's "prompt
  word wrap length limit"), the words after that comma move to the next chunk;
  `BREAK` closes a chunk early;
- every chunk is wrapped in the start and end tokens, padded to 77 and
  encoded on its own, and the chunks' penultimate hidden states (what SDXL
  reads) are joined along the sequence: 77 tokens per chunk;
- each token's hidden state is multiplied by its weight, and the chunk then
  scaled back to its unweighted mean (A1111's "Original" emphasis);
- the pooled embedding is the second encoder's, of the first chunk.

A prompt under 75 tokens without syntax is one chunk of exactly the ids
diffusers makes, so its embeddings are diffusers' bit for bit. A positive
and a negative prompt of different lengths are padded to the same chunk
count with chunks of the empty prompt (A1111's "pad prompt/negative prompt");
an empty negative prompt stays zeros, as diffusers gives it under SDXL's
`force_zeros_for_empty_prompt`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from modal_services.jobs.prompt_syntax import parse_attention

# Prompt tokens per chunk; with the start and end tokens a chunk is CLIP's 77.
CHUNK_TOKENS = 75
CHUNK_LENGTH = CHUNK_TOKENS + 2
# How far back a full chunk looks for a comma to break at (A1111's default).
COMMA_BACKTRACK = 20


@dataclass
class TokenChunk:
    """Up to CHUNK_TOKENS prompt tokens and their weights, without the start and end tokens."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def split_after(self, position: int) -> "TokenChunk":
        """Keep the tokens up to `position` (inclusive); return the rest as a new chunk."""
        rest = TokenChunk(self.ids[position + 1 :], self.weights[position + 1 :])
        del self.ids[position + 1 :], self.weights[position + 1 :]
        return rest

    def encoder_ids(self, tokenizer) -> list[int]:
        """The CHUNK_LENGTH ids the encoder reads: start, tokens, end, then the tokenizer's padding."""
        ids = [tokenizer.bos_token_id, *self.ids, tokenizer.eos_token_id]
        return ids + [tokenizer.pad_token_id] * (CHUNK_LENGTH - len(ids))

    def encoder_weights(self) -> list[float]:
        return [1.0, *self.weights] + [1.0] * (CHUNK_LENGTH - 1 - len(self.weights))


@functools.lru_cache(maxsize=8)
def comma_id(tokenizer) -> int | None:
    """The id of a comma ending a word (looked up once per tokenizer: a CLIP vocabulary has 49,408 entries)."""
    return tokenizer.get_vocab().get(",</w>")


def token_chunks(prompt: str, tokenizer) -> list[TokenChunk]:
    """The prompt in chunks of at most CHUNK_TOKENS weighted tokens (at least one chunk)."""
    comma = comma_id(tokenizer)
    chunks: list[TokenChunk] = []
    chunk = TokenChunk()
    last_comma = -1
    for index, segment in enumerate(parse_attention(prompt)):
        if index:  # BREAK
            chunks.append(chunk)
            chunk, last_comma = TokenChunk(), -1
        tokenized = tokenizer([run.text for run in segment], add_special_tokens=False, verbose=False).input_ids
        for ids, run in zip(tokenized, segment):
            for token in ids:
                if token == comma:
                    last_comma = len(chunk.ids)
                elif len(chunk.ids) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                    # The words after the last comma start the next chunk rather than being split across two.
                    moved = chunk.split_after(last_comma)
                    chunks.append(chunk)
                    chunk, last_comma = moved, -1
                if len(chunk.ids) == CHUNK_TOKENS:
                    chunks.append(chunk)
                    chunk, last_comma = TokenChunk(), -1
                chunk.ids.append(token)
                chunk.weights.append(run.weight)
    if chunk.ids or not chunks:
        chunks.append(chunk)
    return chunks


def weighted(hidden, weights):
    """(1, 77, width) hidden states times their 77 weights, scaled back to the chunk's unweighted mean
    (computed in float32, whatever the encoders' dtype)."""
    states = hidden.float()
    original_mean = states.mean()
    states = states * weights[None, :, None]
    states = states * (original_mean / states.mean())
    return states.to(hidden.dtype)


def encode_chunks(chunks: list[TokenChunk], tokenizer, text_encoder):
    """(the chunks' penultimate hidden states joined, (1, 77 × chunks, width); the first chunk's encoder output).

    One encoder call per chunk, as A1111 makes them: a chunk's embeddings are the same whatever chunks come
    with it."""
    import torch

    device = text_encoder.device
    states, first_output = [], None
    for chunk in chunks:
        output = text_encoder(torch.tensor([chunk.encoder_ids(tokenizer)], device=device), output_hidden_states=True)
        hidden = output.hidden_states[-2]
        weights = chunk.encoder_weights()
        if any(weight != 1.0 for weight in weights):
            hidden = weighted(hidden, torch.tensor(weights, device=device))
        states.append(hidden)
        if first_output is None:
            first_output = output
    return torch.cat(states, dim=1), first_output


class PromptEmbeds(NamedTuple):
    """A prompt as SDXL's UNet reads it: (1, 77 × chunks, 2048) token embeddings, and the (1, 1280) pooled one."""

    embeds: Any
    pooled: Any

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // CHUNK_LENGTH


class TextConditioning(NamedTuple):
    """One prompt's and the negative prompt's embeddings, in diffusers' `encode_prompt` order; the negative
    ones are None without classifier-free guidance."""

    embeds: Any
    negative_embeds: Any
    pooled: Any
    negative_pooled: Any

    def pipeline_arguments(self) -> dict[str, Any]:
        """What a diffusers SDXL pipeline call takes in place of `prompt` and `negative_prompt`."""
        arguments = {"prompt_embeds": self.embeds, "pooled_prompt_embeds": self.pooled}
        if self.negative_embeds is not None:
            arguments |= {"negative_prompt_embeds": self.negative_embeds,
                          "negative_pooled_prompt_embeds": self.negative_pooled}
        return arguments


class SdxlPromptEncoder:
    """A1111-style encoding on a loaded SDXL pipeline's tokenizers and text encoders (with its LoRAs, if any)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def encode(self, prompt: str) -> PromptEmbeds:
        import torch

        pipe = self.pipe
        first, _ = encode_chunks(token_chunks(prompt, pipe.tokenizer), pipe.tokenizer, pipe.text_encoder)
        second, output = encode_chunks(token_chunks(prompt, pipe.tokenizer_2), pipe.tokenizer_2, pipe.text_encoder_2)
        return PromptEmbeds(embeds=torch.cat([first, second], dim=-1), pooled=output.text_embeds[:1])

    def padded(self, prompt: PromptEmbeds, chunks: int) -> PromptEmbeds:
        """`prompt` followed by chunks of the empty prompt, up to `chunks` chunks."""
        import torch

        missing = chunks - prompt.chunks
        if missing <= 0:
            return prompt
        empty = self.encode("").embeds
        return prompt._replace(embeds=torch.cat([prompt.embeds, *[empty] * missing], dim=1))

    def conditioning(self, prompts: list[str], negative: str, guided: bool) -> list[TextConditioning]:
        """Each prompt's conditioning, with the negative prompt's when `guided`, every embedding padded to one
        chunk count so that they batch together (the upscaler's tiles) and with the negative prompt."""
        import torch

        encoded = {prompt: self.encode(prompt) for prompt in dict.fromkeys(prompts)}
        zero_negative = not negative and self.pipe.config.force_zeros_for_empty_prompt
        encoded_negative = self.encode(negative) if guided and not zero_negative else None
        chunks = max(embeds.chunks for embeds in [*encoded.values(), *([encoded_negative] if encoded_negative else [])])
        encoded = {prompt: self.padded(embeds, chunks) for prompt, embeds in encoded.items()}
        if not guided:
            return [TextConditioning(encoded[prompt].embeds, None, encoded[prompt].pooled, None) for prompt in prompts]
        if encoded_negative is None:
            encoded_negative = PromptEmbeds(*map(torch.zeros_like, next(iter(encoded.values()))))
        negative_embeds, negative_pooled = self.padded(encoded_negative, chunks)
        return [TextConditioning(encoded[prompt].embeds, negative_embeds, encoded[prompt].pooled, negative_pooled)
                for prompt in prompts]

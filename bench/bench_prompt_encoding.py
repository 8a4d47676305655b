"""A1111-style prompt encoding against diffusers' plain `encode_prompt`, and against one denoising step.

On the tiny SDXL (CPU): the same short prompt both ways (one chunk each: the
cost of parsing and of the chunk bookkeeping), a weighted 200-token prompt
(three chunks, three encoder calls per encoder; diffusers reads its first 77
tokens only), and one UNet step at 512² with classifier-free guidance, the
unit a job repeats `steps` times. Expected: the encoding, done once per job,
is negligible against the denoising.

    .venv/bin/python bench/bench_prompt_encoding.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modal_services.engines.sdxl.prompt_encoding import SdxlPromptEncoder  # noqa: E402
from tests.fixtures.tiny_sdxl import tiny_sdxl_components  # noqa: E402

SHORT = "masterpiece, best quality, 1girl, cat ears, smile, outdoors, cherry blossoms"
NEGATIVE = "lowres, bad anatomy, worst quality"
LONG = ", ".join(["(masterpiece:1.2)", "[blurry]"] + ["cat", "dog", "red", "sky", "sea"] * 10)


def median_ms(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from diffusers import StableDiffusionXLPipeline

    components = tiny_sdxl_components()
    components.pop("controlnet")
    pipe = StableDiffusionXLPipeline(**components)
    encoder = SdxlPromptEncoder(pipe)

    def diffusers_plain(prompt: str):
        return pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE)

    def a1111(prompt: str):
        return encoder.conditioning([prompt], NEGATIVE, guided=True)[0]

    text = a1111(SHORT)
    latents = torch.randn(2, 4, 64, 64)
    time_ids = torch.tensor([[512, 512, 0, 0, 512, 512]] * 2, dtype=torch.float32)

    def unet_step():
        embeds = torch.cat([text.negative_embeds, text.embeds])
        pooled = torch.cat([text.negative_pooled, text.pooled])
        pipe.unet(latents, 500, encoder_hidden_states=embeds,
                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})

    with torch.inference_mode():
        for run in (lambda: diffusers_plain(SHORT), lambda: a1111(LONG), unet_step):
            run()  # warm-up
        timings = {
            "diffusers encode_prompt, short prompt": median_ms(args.repeats, lambda: diffusers_plain(SHORT)),
            "A1111 encoding, same short prompt": median_ms(args.repeats, lambda: a1111(SHORT)),
            "A1111 encoding, weighted 200-token prompt": median_ms(args.repeats, lambda: a1111(LONG)),
            "one UNet step, 512², with CFG": median_ms(args.repeats, unet_step),
        }
    tokens = len(pipe.tokenizer(LONG, add_special_tokens=False, verbose=False).input_ids)
    print(f"tiny SDXL on CPU ({torch.get_num_threads()} threads), median of {args.repeats}; long prompt {tokens} tokens, "
          f"{a1111(LONG).embeds.shape[1] // 77} chunks")
    for name, ms in timings.items():
        print(f"{name:45s} {ms:8.2f} ms")
    step = timings["one UNet step, 512², with CFG"]
    for name in list(timings)[1:3]:
        print(f"{name}: {timings[name] / (28 * step):.2%} of a 28-step job's denoising")


if __name__ == "__main__":
    main()

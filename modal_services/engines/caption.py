"""The caption engine: Qwen3-VL-2B-Instruct through transformers, and the booru tagger for the `tags` style.

Both are loaded from the models volume (`models/qwen3-vl-2b/`, a Hugging Face
snapshot; the WD tagger's folder), never from the hub. The VLM writes every
style but `tags`, several images in one `generate` call; `tags` is the
tagger's, as LoRA trainers caption their datasets. Each style needs only its
own model: a missing one fails the styles that read it.
"""

from __future__ import annotations

import json
from pathlib import Path

from modal_services.engines.loading import loading
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.imaging import decode_image
from modal_services.jobs.requests import CaptionRequest
from modal_services.jobs.records import ProgressFn
from modal_services.layout import CAPTION_MODEL, Layout
from modal_services.safety.judge import minor_tags, rated_sexual
from modal_services.safety.tagger import Tagger, Tags


STYLE_PROMPTS = {
    "descriptive": (
        "Describe this image in one detailed paragraph: the subject, what they are doing, the setting, "
        "composition, lighting, colours and artistic style. Start directly with the description."
    ),
    "short": "Describe this image in one short sentence suitable as alt text.",
    # What /generate takes back: Illustrious-XL (the default checkpoint) is prompted in Danbooru tags. The VLM
    # writes it, not the tagger: it reads photos as well as drawings, and orders the prompt (quality tags, the
    # subject count, the character, then the scene) where the tagger gives a dataset's tags and a rating.
    "prompt": (
        "Write a prompt for the Illustrious-XL image model that would recreate this image, as Danbooru tags: "
        "lowercase, comma-separated, starting with masterpiece, best quality, then the subject count "
        "(1girl, 1boy, no humans...), the character and their hair, eyes, clothing, pose and expression, "
        "then the setting, lighting, colours and art style. Output only the prompt."
    ),
}
MAX_NEW_TOKENS = {"descriptive": 256, "short": 48, "prompt": 200, "question": 320}

# The style the booru tagger writes, as LoRA trainers' captioners do (kohya's tag_images_by_wd14_tagger with
# --character_tags_first --use_rating_tags_as_last_tag --remove_underscore, SmilingWolf's own demo): character
# tags first, then the general tags at or above GENERAL_THRESHOLD, likeliest first, then the rating's plain word.
TAGGER_STYLE = "tags"
# The WD taggers' usual default for general tags (character tags: the tagger's own CHARACTER_THRESHOLD).
GENERAL_THRESHOLD = 0.35
# Emoticon tags keep their underscores: `^ ^` is not the tag `^_^`. The list the WD tagger tools share.
EMOTICON_TAGS = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
                           ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})
# What the models a caption needs are listed under in the base-model registry (`needed_by`).
TAGS_CAPTION_PURPOSE = "tags_caption"

# The files a snapshot must have before loading is worth trying.
REQUIRED_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")


def _image_only_processor_class():
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3-VL's processor without its video half.

        The stock class insists on a video processor, which needs torchvision;
        captioning never sees video, so the same processor works everywhere.
        """

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen3VLProcessor


def _read_chat_template(model_dir: Path, tokenizer) -> str | None:
    template_json = model_dir / "chat_template.json"
    if template_json.is_file():
        return json.loads(template_json.read_text())["chat_template"]
    template_jinja = model_dir / "chat_template.jinja"
    if template_jinja.is_file():
        return template_jinja.read_text()
    return tokenizer.chat_template


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(device: str):
    import torch

    if device.startswith("cuda"):
        # T4s have no bf16; L4 and newer do.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class CaptionEngine:
    """Loading is two steps so that a Modal memory snapshot can capture the first:
    `load_weights()` reads the files into CPU memory, `move_to(device)` puts the
    models on the GPU after the snapshot is restored. `load()` does both, for
    whichever of the two models is installed."""

    def __init__(self, layout: Layout, max_side: int = 1024, device: str | None = None, dtype: str | None = None):
        self.model_dir = layout.models_dir / CAPTION_MODEL
        self.max_side = max_side
        self.device = device
        self.dtype = dtype  # a torch dtype name; None: the best for the device
        self.vlm_ready = False
        self.model = None
        self.processor = None
        self.tagger = Tagger(layout.models_dir, device)

    @property
    def loaded(self) -> bool:
        """Both models ready. Until then the worker calls `load` before each job, which picks up a model
        /setup has downloaded since."""
        return self.vlm_ready and self.tagger.loaded

    def missing_files(self) -> list[str]:
        """Inside the model's folder (named relative to it: a message must not show where the data dir is)."""
        missing = [name for name in REQUIRED_FILES if not (self.model_dir / name).is_file()]
        if not any(self.model_dir.glob("*.safetensors")):
            missing.append("*.safetensors (the weights)")
        return missing

    def missing_models(self, request: CaptionRequest) -> list[str]:
        """What `request` needs that the volume lacks: the tagger for a `tags` caption, the VLM for the others.
        Checked before `load`, which would import torch first."""
        if is_tagger_caption(request):
            absent = [] if self.tagger.loaded else self.tagger.missing_files()
            return [f"wd-tagger ({', '.join(absent)})"] if absent else []
        absent = [] if self.vlm_ready else self.missing_files()
        return [f"qwen3-vl-2b ({', '.join(absent)})"] if absent else []

    def load(self) -> None:
        device = self.device or best_device()
        self.load_weights(device)
        self.move_to(device)

    def load_weights(self, device_to_come: str = "cpu") -> None:
        """Read the installed models into CPU memory (the VLM in the dtype `device_to_come` wants). A missing
        one is skipped: the styles that read it report it; a broken one fails here."""
        if self.model is None and not self.missing_files():
            self._read_vlm(device_to_come)
        try:
            self.tagger.load(staging_device="cpu")
        except ToolboxError as error:
            if error.code is not ErrorCode.MODELS_MISSING:
                raise

    def _read_vlm(self, device_to_come: str) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        dtype = getattr(torch, self.dtype) if self.dtype else dtype_for(device_to_come)
        with loading("the caption model", self.model_dir):
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, padding_side="left")
            image_processor = AutoImageProcessor.from_pretrained(self.model_dir)
            self.processor = _image_only_processor_class()(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=_read_chat_template(self.model_dir, tokenizer),
            )
            self.model = AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=dtype).eval()

    def move_to(self, device: str) -> None:
        if self.model is not None:
            self.model.to(device)
            self.vlm_ready = True
        self.tagger.place()
        self.device = device

    def caption(self, request: CaptionRequest, progress: ProgressFn) -> list[str]:
        """One caption per image: the tagger's tags for a `tags` caption, else the VLM's text."""
        if is_tagger_caption(request):
            return self._tag(request.images, progress)
        return self._describe(request, progress)

    def _tag(self, images: list[bytes], progress: ProgressFn) -> list[str]:
        for index, data in enumerate(images, start=1):
            decode_image(data, name=f"Image {index}")  # a bad image named as the other styles name it
        progress(0.0, "tagging")
        read = self.tagger.tag(images)
        for index, tags in enumerate(read, start=1):
            if minor_tags(tags) and rated_sexual(tags):
                # The drawn-minor rule of the image check: such an image is never described, not even as tags.
                raise ToolboxError(ErrorCode.INVALID_INPUT, f"Image {index} reads as a drawing of a minor in a sexual "
                                   "context; it is not captioned.")
        return [booru_caption(tags) for tags in read]

    def _describe(self, request: CaptionRequest, progress: ProgressFn) -> list[str]:
        """All the images in one `generate` call."""
        import torch

        style, question = request.style, request.question
        pictures = [self._prepare(data, index) for index, data in enumerate(request.images, start=1)]
        self._require_vlm()
        instruction = question.strip() if question else STYLE_PROMPTS[style]
        max_new_tokens = MAX_NEW_TOKENS["question" if question else style]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(
            text=[prompt] * len(pictures), images=pictures, padding=True, return_tensors="pt"
        ).to(self.device)
        inputs.pop("token_type_ids", None)
        inputs.pop("mm_token_type_ids", None)

        progress(0.0, "captioning")
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    repetition_penalty=1.05,
                    stopping_criteria=[_TokenProgress(progress, max_new_tokens)],
                )
        except torch.cuda.OutOfMemoryError as exc:
            raise ToolboxError(
                ErrorCode.CUDA_OOM, "The GPU ran out of memory captioning this batch: try fewer images at once."
            ) from exc
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [tidy_caption(text, "question" if question else style) for text in texts]

    def _require_vlm(self) -> None:
        if not self.vlm_ready:
            self.load()
        if not self.vlm_ready:
            raise ToolboxError(
                ErrorCode.MODELS_MISSING,
                f"The caption model (Qwen3-VL-2B) is not installed (missing in {CAPTION_MODEL}/: "
                f"{', '.join(self.missing_files())}): {remedies.download('qwen3-vl-2b')}.",
            )

    def _prepare(self, data: bytes, index: int):
        from PIL import Image

        image = decode_image(data, name=f"Image {index}").image
        if max(image.size) > self.max_side:
            # The model sees at most max_side px a side: more costs tokens, not quality.
            image.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
        return image


class _TokenProgress:
    """A stopping criterion that never stops: it counts generated tokens for progress."""

    def __init__(self, progress: ProgressFn, max_new_tokens: int):
        self.progress = progress
        self.max_new_tokens = max_new_tokens
        self.generated = 0

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.generated += 1
        self.progress(
            min(self.generated / self.max_new_tokens, 0.99), f"captioning · token {self.generated}/{self.max_new_tokens}"
        )
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def tidy_caption(text: str, style: str) -> str:
    text = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t").strip()
    if style == "prompt":  # a comma-separated tag list: each tag once, lowercase
        seen: dict[str, None] = {}
        for tag in text.replace("\n", ",").split(","):
            tag = tag.strip().strip(".").lower()
            if tag:
                seen.setdefault(tag, None)
        return ", ".join(seen)
    return " ".join(text.split())


def booru_caption(tags: Tags) -> str:
    """One image's tags as a LoRA dataset's caption: its characters (the tagger reports those at its
    CHARACTER_THRESHOLD or more), its general tags at or above GENERAL_THRESHOLD, each likeliest first,
    then its rating; comma-separated, underscores read as spaces but in emoticons."""
    characters = sorted(tags.characters, key=tags.characters.get, reverse=True)
    names = [*characters, *tags.above(GENERAL_THRESHOLD), tags.rating]
    return ", ".join(name if name in EMOTICON_TAGS else name.replace("_", " ") for name in names)


def is_tagger_caption(request: CaptionRequest) -> bool:
    """A `tags` caption is the tagger's; a question always goes to the VLM."""
    return request.style == TAGGER_STYLE and not request.question


def caption_purpose(request: CaptionRequest) -> str:
    """What the models this caption needs are listed under (`needed_by`): a `tags` caption reads only the
    tagger, every other caption only the VLM."""
    return TAGS_CAPTION_PURPOSE if is_tagger_caption(request) else request.kind

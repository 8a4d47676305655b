"""What /setup offers: the base models, and the recommended LoRAs from CivitAI.

One `ModelEntry` per base model, plus `sdxl-base` (SDXL's diffusers configs
and tokenizers, no weights) that loading a single-file checkpoint needs
offline; one `StarterLora` per recommended LoRA, which the CivitAI importer
brings into the library like any `/models import`. Pure data: importing this
module pulls in nothing heavy, so the bot can show the lists (and an admin
can read here what will be fetched before it is).

A source is data too. The download engine picks its fetcher by the
source's `kind` (`modal_services.net.fetchers.FETCHERS`), so a new kind of
source is one dataclass here plus one fetcher there, with no change to the engine.

Most entries are the base set every setup downloads. An entry with `optional`
terms (a large or restrictively licensed model a feature needs) is left out
until an admin enables it, accepting those terms (`optional_models.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Collection, Mapping

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.layout import (
    ANTELOPEV2_DIR,
    CAPTION_MODEL,
    CLIP_VIT_H_DIR,
    CONTROLNET_TILE_DIR,
    FLUX_DIR,
    ILLUSTRIOUS_CHECKPOINT,
    INSTANTID_ADAPTER_FILE,
    INSTANTID_CONTROLNET_DIR,
    INSTANTID_DIR,
    IP_ADAPTER_FILE,
    NSFW_CLASSIFIER_DIR,
    SDXL_CONFIG_DIR,
    SDXL_VAE_DIR,
    TAGGER_DIR,
)

# The face-analysis files, as antelopev2 names them (`modal_services.engines.sdxl.faces` reads them).
FACE_DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
FACE_RECOGNISER_FILE = "glintr100.onnx"
# InstantID's face adapter as upstream publishes it: a pickle, converted at download.
INSTANTID_PICKLED_ADAPTER = "ip-adapter.bin"

MODELS = "models"  # the models volume (`/vol/models`, `<data dir>/models`)
LORAS = "loras"  # the LoRA volume (`/vol/loras`, `<data dir>/loras`)


@dataclass(frozen=True)
class PublishedFile:
    """What a source publishes about one file; None where it publishes nothing.

    Anything left None is taken from what the source reports at download time
    (the Hub's LFS sha256 and sizes), and the manifest keeps what was verified.
    """

    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class HFSource:
    """Files of a Hugging Face repo, fetched through huggingface_hub.

    `include` holds repo paths or globs (`tokenizer/*`); empty means the
    whole snapshot. `rename` moves a repo path to another path under the
    model folder (IP-Adapter's weights live in `sdxl_models/` upstream).
    """

    repo_id: str
    revision: str = "main"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = (".gitattributes",)
    rename: Mapping[str, str] = field(default_factory=dict)
    kind: str = "huggingface"


@dataclass(frozen=True)
class URLSource:
    """One file at a plain URL (`download_file`), saved as `filename` in the model folder."""

    url: str
    filename: str
    kind: str = "url"


@dataclass(frozen=True)
class Terms:
    """What an admin accepts by enabling an optional model."""

    summary: str  # the licence in one line: what it allows and forbids
    url: str  # the licence or the model page
    # The hub makes each account accept the licence on the model page before its token can download.
    gated: bool = False


@dataclass(frozen=True)
class ModelEntry:
    key: str
    name: str
    source: HFSource | URLSource
    # Folder relative to the volume root; the model's files live inside it.
    folder: str
    approx_bytes: int  # for the panel before the source has been asked
    volume: str = MODELS
    needed_by: tuple[str, ...] = ()
    # Published sizes / sha256s, by path inside `folder`.
    published: Mapping[str, PublishedFile] = field(default_factory=dict)
    # None: part of the base set. Terms: optional, downloaded only once an admin enables it.
    optional: Terms | None = None
    # Pickled weights the source publishes → the safetensors file each becomes once downloaded
    # (`modal_services.base_models.pickle_weights`); only the converted file is kept.
    converted: Mapping[str, str] = field(default_factory=dict)
    # A checkpoint's sampler for jobs that name none (`modal_services.jobs.samplers`): its model card's advice.
    sampler: str | None = None

    def dest_for(self, repo_path: str) -> str:
        """Where a source file lands, relative to `folder`."""
        rename = getattr(self.source, "rename", {})
        return rename.get(repo_path, repo_path)


def _folder_of(relative_file: str) -> str:
    return str(PurePosixPath(relative_file).parent)


# The SDXL configs that `from_single_file(path, config=<dir>)` reads offline.
SDXL_CONFIG_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/*",
    "tokenizer_2/*",
)

# FLUX.1-dev's diffusers folders (what `FluxPipeline.from_pretrained` reads).
FLUX_FILES = (
    "model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*",
    "transformer/*", "vae/*",
)

BASE_MODELS: dict[str, ModelEntry] = {
    entry.key: entry
    for entry in (
        ModelEntry(
            key="illustrious-xl",
            name="Illustrious-XL v2.0",
            source=HFSource("OnomaAIResearch/Illustrious-XL-v2.0", include=(PurePosixPath(ILLUSTRIOUS_CHECKPOINT).name,)),
            folder=_folder_of(ILLUSTRIOUS_CHECKPOINT),
            approx_bytes=6_938_000_000,
            needed_by=("upscale", "generate"),
            sampler="Euler a",
        ),
        ModelEntry(
            key="controlnet-tile",
            name="ControlNet Tile SDXL (xinsir)",
            source=HFSource("xinsir/controlnet-tile-sdxl-1.0", include=("config.json", "diffusion_pytorch_model.safetensors")),
            folder=CONTROLNET_TILE_DIR,
            approx_bytes=2_502_000_000,
            needed_by=("upscale", "generate"),
        ),
        ModelEntry(
            key="sdxl-vae",
            name="SDXL VAE fp16-fix",
            source=HFSource("madebyollin/sdxl-vae-fp16-fix", include=("config.json", "diffusion_pytorch_model.safetensors")),
            folder=SDXL_VAE_DIR,
            approx_bytes=335_000_000,
            needed_by=("upscale", "generate"),
        ),
        ModelEntry(
            key="ip-adapter",
            name="IP-Adapter Plus SDXL ViT-H",
            source=HFSource(
                "h94/IP-Adapter",
                include=("sdxl_models/" + PurePosixPath(IP_ADAPTER_FILE).name,),
                rename={"sdxl_models/" + PurePosixPath(IP_ADAPTER_FILE).name: PurePosixPath(IP_ADAPTER_FILE).name},
            ),
            folder=_folder_of(IP_ADAPTER_FILE),
            approx_bytes=848_000_000,
            needed_by=("upscale", "generate"),
        ),
        ModelEntry(
            key="clip-vit-h",
            name="CLIP ViT-H-14 image encoder",
            source=HFSource(
                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                include=("config.json", "model.safetensors", "preprocessor_config.json"),
            ),
            folder=CLIP_VIT_H_DIR,
            approx_bytes=3_944_000_000,
            needed_by=("upscale", "generate"),
        ),
        ModelEntry(
            key="qwen3-vl-2b",
            name="Qwen3-VL-2B-Instruct",
            source=HFSource("Qwen/Qwen3-VL-2B-Instruct", exclude=(".gitattributes", "README.md")),
            folder=CAPTION_MODEL,
            approx_bytes=4_260_000_000,
            needed_by=("caption",),
        ),
        ModelEntry(
            key="sdxl-base",
            name="SDXL configs and tokenizers",
            source=HFSource("stabilityai/stable-diffusion-xl-base-1.0", include=SDXL_CONFIG_FILES),
            folder=SDXL_CONFIG_DIR,
            approx_bytes=5_000_000,
            needed_by=("upscale", "generate"),
        ),
        ModelEntry(
            # ViT-base, labels normal/nsfw, Apache-2.0: judges every generated and upscaled image.
            key="nsfw-classifier",
            name="NSFW image classifier (Falconsai ViT)",
            source=HFSource(
                "Falconsai/nsfw_image_detection", include=("config.json", "model.safetensors", "preprocessor_config.json")
            ),
            folder=NSFW_CLASSIFIER_DIR,
            approx_bytes=343_000_000,
            needed_by=("upscale", "generate", "flux_generate"),
        ),
        ModelEntry(
            # EVA02-Large, ONNX, Apache-2.0: rates and tags every generated and upscaled image (drawn minors are
            # withheld whatever the policy, so every judged job needs it), and writes the `tags` caption style
            # (`tags_caption`: only those captions need it; every other caption reads only the VLM).
            key="wd-tagger",
            name="Booru tagger (SmilingWolf WD EVA02-Large v3)",
            source=HFSource("SmilingWolf/wd-eva02-large-tagger-v3", include=("model.onnx", "selected_tags.csv")),
            folder=TAGGER_DIR,
            approx_bytes=1_260_000_000,
            needed_by=("upscale", "generate", "flux_generate", "tags_caption"),
        ),
        ModelEntry(
            key="flux1-dev",
            name="FLUX.1-dev",
            # The diffusers layout only: the repository's root also holds the same weights as single
            # files (flux1-dev.safetensors, ae.safetensors), another 24 GB nothing here loads.
            source=HFSource("black-forest-labs/FLUX.1-dev", include=FLUX_FILES,
                            exclude=(".gitattributes", "flux1-dev.safetensors", "ae.safetensors")),
            folder=FLUX_DIR,
            approx_bytes=33_700_000_000,
            needed_by=("flux_generate",),
            optional=Terms(
                "FLUX.1 [dev] Non-Commercial License: images may be used, but not the model for commercial "
                "purposes without a licence from Black Forest Labs; accept it on the model page first.",
                "https://huggingface.co/black-forest-labs/FLUX.1-dev",
                gated=True,
            ),
        ),
        # InstantID (`/generate face:`): optional, for their licences; `generate_request` checks both are enabled.
        ModelEntry(
            key="instantid",
            name="InstantID (IdentityNet and face adapter)",
            source=HFSource("InstantX/InstantID", include=(
                f"{PurePosixPath(INSTANTID_CONTROLNET_DIR).name}/config.json",
                f"{PurePosixPath(INSTANTID_CONTROLNET_DIR).name}/diffusion_pytorch_model.safetensors",
                INSTANTID_PICKLED_ADAPTER,
            )),
            folder=INSTANTID_DIR,
            approx_bytes=4_200_000_000,
            converted={INSTANTID_PICKLED_ADAPTER: PurePosixPath(INSTANTID_ADAPTER_FILE).name},
            optional=Terms(
                "Research use: InstantX releases the InstantID checkpoints for research purposes (the code is "
                "Apache-2.0); whoever enables it answers for the faces people use",
                "https://huggingface.co/InstantX/InstantID",
            ),
        ),
        ModelEntry(
            key="antelopev2",
            name="antelopev2 face analysis (insightface)",
            # A mirror of insightface's own antelopev2 release (its download link is gone); the sha256s are
            # those of the files in that release, so a mirror that changed them fails the download.
            source=HFSource("DIAMONIK7777/antelopev2", include=(FACE_DETECTOR_FILE, FACE_RECOGNISER_FILE)),
            folder=ANTELOPEV2_DIR,
            approx_bytes=277_600_000,
            published={
                FACE_DETECTOR_FILE: PublishedFile(sha256="5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91"),
                FACE_RECOGNISER_FILE: PublishedFile(sha256="4ab1d6435d639628a6f3e5008dd4f929edf4c4124b1a7169e1048f9fef534cdf"),
            },
            optional=Terms(
                "Non-commercial research use only: insightface's pretrained face models may not be used "
                "commercially",
                "https://github.com/deepinsight/insightface#license",
            ),
        ),
    )
}

# What a face generation needs, both enabled by an admin.
INSTANTID_MODELS = ("instantid", "antelopev2")


@dataclass(frozen=True)
class StarterLora:
    """A recommended LoRA: optional in /setup, `toolbox setup --only <key>`, imported from CivitAI."""

    key: str
    name: str
    civitai_model_id: int  # its newest version is imported
    approx_bytes: int  # for the panel before CivitAI has been asked
    purpose: str

    @property
    def reference(self) -> str:
        """What the importer is given: the bare model id (its newest published version)."""
        return str(self.civitai_model_id)

    @property
    def page_url(self) -> str:
        return f"https://civitai.com/models/{self.civitai_model_id}"


# Both made for Illustrious-XL, the default checkpoint.
STARTER_LORAS: dict[str, StarterLora] = {
    lora.key: lora
    for lora in (
        StarterLora("lora-aesthetic-quality", "Aesthetic Quality", 929497, 185_000_000,
                    "overall aesthetic quality (masterpiece, best quality)"),
        StarterLora("lora-detailer-il", "Detailer IL", 1231943, 50_000_000, "finer detail in upscales"),
    )
}


def split_setup_keys(keys: list[str] | tuple[str, ...] | None) -> tuple[list[str], list[StarterLora]]:
    """`--only` keys as base-model keys and recommended LoRAs, in the order given; an unknown key is refused."""
    base: list[str] = []
    loras: list[StarterLora] = []
    for key in keys or ():
        if key in STARTER_LORAS:
            loras.append(STARTER_LORAS[key])
        elif key in BASE_MODELS:
            base.append(key)
        else:
            raise ToolboxError(
                ErrorCode.INVALID_INPUT, f"Unknown model {key!r}. Known: {', '.join([*BASE_MODELS, *STARTER_LORAS])}."
            )
    return base, loras


def get_entry(key: str, registry: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    registry = BASE_MODELS if registry is None else registry
    try:
        return registry[key]
    except KeyError:
        raise ToolboxError(
            ErrorCode.INVALID_INPUT, f"Unknown model {key!r}. Known: {', '.join(registry)}."
        ) from None


def resolve_keys(keys: list[str] | tuple[str, ...] | None, registry: Mapping[str, ModelEntry] | None = None,
                 enabled: Collection[str] = ()) -> list[ModelEntry]:
    """The entries for `keys` (when empty: the base set and the `enabled` optional models), in registry order, each once."""
    registry = BASE_MODELS if registry is None else registry
    if not keys:
        return [entry for entry in registry.values() if entry.optional is None or entry.key in enabled]
    wanted = {get_entry(key, registry).key for key in keys}
    return [entry for key, entry in registry.items() if key in wanted]


def optional_entries(registry: Mapping[str, ModelEntry] | None = None) -> list[ModelEntry]:
    """The models an admin may enable, in registry order."""
    return [entry for entry in (BASE_MODELS if registry is None else registry).values() if entry.optional is not None]


def models_for(purpose: str) -> list[str]:
    """The keys a service needs (`caption`, `tags_caption`, `upscale`, `generate`): what the bot checks before
    spawning GPU work."""
    return [entry.key for entry in BASE_MODELS.values() if purpose in entry.needed_by]

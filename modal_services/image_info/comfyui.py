"""ComfyUI's `prompt` (the graph it ran) and `workflow` (the editor's graph) read into settings.

The `prompt` chunk maps node ids to `{"class_type", "inputs"}`, an input that
comes from another node being `[node id, output]`. The `workflow` chunk
lists nodes with positional `widgets_values` and links; it is turned into the
same shape for the nodes read here. From the first-pass sampler (KSampler or
KSamplerAdvanced) the links lead to the prompts (CLIPTextEncode), the size
(EmptyLatentImage) and, along the model input, the LoRAs (LoraLoader) down to
the checkpoint (CheckpointLoaderSimple, or UNETLoader). Each walk is bounded,
so a looping or endless graph ends.
"""

from __future__ import annotations

from typing import Any, Iterator

from modal_services.image_info.infotext import joined_sampler
from modal_services.image_info.settings import GenerationSettings, LoraUse, as_float

SOURCE = "ComfyUI"
SAMPLERS = ("KSampler", "KSamplerAdvanced")
# The editor's widget values of the nodes read here, in order (`control_after_generate` follows a seed).
WIDGETS = {
    "KSampler": ("seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "KSamplerAdvanced": ("add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                         "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"),
    "CheckpointLoaderSimple": ("ckpt_name",),
    "UNETLoader": ("unet_name", "weight_dtype"),
    "LoraLoader": ("lora_name", "strength_model", "strength_clip"),
    "LoraLoaderModelOnly": ("lora_name", "strength_model"),
    "CLIPTextEncode": ("text",),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "PrimitiveNode": ("value",),
}
# ComfyUI's sampler and scheduler names as A1111 names them ("normal" is the default: no schedule named).
SAMPLER_NAMES = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM",
}
SCHEDULE_NAMES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform", "simple": "Simple",
                  "beta": "Beta", "kl_optimal": "KL Optimal", "ddim_uniform": "Uniform", "normal": None}
# How far a walk along links goes: deeper graphs are not what people generate with.
MAX_HOPS = 64

Graph = dict[str, dict[str, Any]]


def read_comfyui(prompt: Any, workflow: Any) -> GenerationSettings | None:
    """The settings of the graph in `prompt` (else `workflow`), both parsed JSON; None without a sampler."""
    for graph in (_prompt_graph(prompt), _workflow_graph(workflow)):
        sampler_id = _first_pass_sampler(graph)
        if sampler_id is not None:
            return _settings(graph, graph[sampler_id]["inputs"])
    return None


def _prompt_graph(prompt: Any) -> Graph:
    if not isinstance(prompt, dict):
        return {}
    return {str(node_id): {"class_type": node.get("class_type"), "inputs": node.get("inputs")}
            for node_id, node in prompt.items()
            if isinstance(node, dict) and isinstance(node.get("inputs"), dict)}


def _workflow_graph(workflow: Any) -> Graph:
    """The editor's graph in the `prompt` shape: widget values by name, linked inputs as [node id, output]."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        return {}
    sources = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 4:
            sources[link[0]] = [str(link[1]), link[2]]
    graph: Graph = {}
    for node in workflow["nodes"]:
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        values = node.get("widgets_values")
        inputs = dict(zip(WIDGETS.get(kind, ()), values)) if isinstance(values, list) else {}
        for slot in node.get("inputs") or []:
            if isinstance(slot, dict) and slot.get("link") in sources:
                inputs[str(slot.get("name"))] = sources[slot["link"]]
        graph[str(node.get("id"))] = {"class_type": kind, "inputs": inputs}
    return graph


def _first_pass_sampler(graph: Graph) -> str | None:
    """The sampler that makes the image from noise (denoise 1, or none given), the lowest node id first."""
    samplers = [node_id for node_id, node in graph.items() if node["class_type"] in SAMPLERS]
    samplers.sort(key=lambda node_id: (as_float(graph[node_id]["inputs"].get("denoise", 1)) not in (1.0, None),
                                       int(node_id) if node_id.isdigit() else float("inf"), node_id))
    return samplers[0] if samplers else None


def _settings(graph: Graph, sampler: dict[str, Any]) -> GenerationSettings:
    latent = _linked_node(graph, sampler.get("latent_image"))
    checkpoint, loras = _model_chain(graph, sampler.get("model"))
    sampler_name = _value(graph, sampler.get("sampler_name"))
    schedule = SCHEDULE_NAMES.get(str(_value(graph, sampler.get("scheduler"))), None)
    return GenerationSettings(
        source=SOURCE, prompt=_text(graph, sampler.get("positive")), negative_prompt=_text(graph, sampler.get("negative")),
        steps=_value(graph, sampler.get("steps")), cfg=_value(graph, sampler.get("cfg")),
        seed=_value(graph, sampler.get("seed", sampler.get("noise_seed"))),
        sampler=joined_sampler(SAMPLER_NAMES.get(str(sampler_name), sampler_name and str(sampler_name)), schedule),
        width=_value(graph, latent.get("width")), height=_value(graph, latent.get("height")),
        model=_file_stem(checkpoint), loras=loras,
        denoising_strength=None if as_float(sampler.get("denoise", 1)) == 1.0 else sampler.get("denoise"),
    )


def _linked_node(graph: Graph, link: Any) -> dict[str, Any]:
    """The inputs of the node `link` ([node id, output]) comes from; empty when it names none."""
    if isinstance(link, list) and link and str(link[0]) in graph:
        return graph[str(link[0])]["inputs"]
    return {}


def _value(graph: Graph, value: Any) -> Any:
    """A widget's value, following links to the node that holds it (a primitive, a seed node...)."""
    for _ in range(MAX_HOPS):
        if not isinstance(value, list):
            return value
        inputs = _linked_node(graph, value)
        value = next((inputs[name] for name in ("value", "seed", "noise_seed", "int", "float", "string", "text")
                      if name in inputs), None)
    return None


def _text(graph: Graph, link: Any) -> str:
    """The text a conditioning input was encoded from (CLIPTextEncode's, or SDXL's `text_g`), through
    the nodes that pass conditioning on."""
    for _ in range(MAX_HOPS):
        inputs = _linked_node(graph, link)
        for name in ("text", "text_g"):
            if name in inputs:
                text = _value(graph, inputs[name])
                return text if isinstance(text, str) else ""
        link = next((inputs[name] for name in ("conditioning", "conditioning_1", "conditioning_to") if name in inputs), None)
        if link is None:
            return ""
    return ""


def _model_chain(graph: Graph, link: Any) -> tuple[str | None, list[LoraUse]]:
    """(the checkpoint's file, the LoRAs applied on the way to it), along the model inputs."""
    loras: list[LoraUse] = []
    for inputs in _along_model(graph, link):
        if "lora_name" in inputs:
            loras.append(LoraUse(_file_stem(inputs["lora_name"]) or "", inputs.get("strength_model")))
        for name in ("ckpt_name", "unet_name"):
            if name in inputs:
                return inputs[name], loras
    return None, loras


def _along_model(graph: Graph, link: Any) -> Iterator[dict[str, Any]]:
    seen = set()
    for _ in range(MAX_HOPS):
        if not isinstance(link, list) or not link or str(link[0]) in seen:
            return
        seen.add(str(link[0]))
        inputs = _linked_node(graph, link)
        yield inputs
        link = inputs.get("model")


def _file_stem(path: Any) -> str | None:
    """`loras/x/name.safetensors` → `name`: how the library and A1111 name a model."""
    if not isinstance(path, str) or not path:
        return None
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, extension = name.rpartition(".")
    return stem if dot and extension.lower() in ("safetensors", "ckpt", "pt", "bin", "gguf", "sft") else name

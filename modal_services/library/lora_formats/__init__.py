"""LoRA files: what kind one is, whether it fits its model, and a form diffusers loads.

`files` reads and writes them and tells a Flux LoRA from an SDXL one;
`sdxl` checks and converts SDXL LoRAs (with `sdxl_fit`, diffusers' key
conversion and the shape checks, and `factorization`, the rewrite of a weight
delta as a plain LoRA); `flux` checks Flux LoRAs; `layouts` builds the layers
of the models they must fit.

People publish SDXL LoRAs in several layouts:

- diffusers / PEFT: `unet.….lora_A.weight` / `lora_B.weight` (or the older
  `…to_q_lora.down.weight`);
- Kohya: `lora_unet_*`, `lora_te1_*`, `lora_te2_*` with `lora_down`,
  `lora_up`, `alpha` (in diffusers or in SGM block naming);
- LyCORIS LoCon: the same keys on convolutions too, optionally with a CP
  `lora_mid`;
- LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, optional
  `hada_t1`/`hada_t2`) and LoKr (`lokr_w1[_a/_b]`, `lokr_w2[_a/_b]`,
  optional `lokr_t2`);
- full-weight deltas (`diff`).

diffusers' `load_lora_weights` takes the first three (minus `lora_mid`) and
refuses the rest. Every one of them is a weight delta ΔW per layer, so the
rest are rewritten as plain Kohya LoRAs (`lora_down`, `lora_up`, `alpha`):
exactly where the delta's structure gives a low-rank factorisation (CP LoCon,
LoHa's Hadamard product of two low-rank matrices, LoKr's Kronecker product),
by SVD otherwise, truncated at `max_rank` with the error recorded.

Before anything is accepted, the layer names go through diffusers' own key
conversion and the shapes are checked against the target model's layers,
built from its configs on the `meta` device: no SDXL weights are loaded, and
an SD 1.5 or Flux LoRA is caught here instead of in the upscaler.

DoRA (LyCORIS `dora_scale`, which diffusers' SDXL loader drops) is rewritten
in PEFT's own layout, `lora_A` / `lora_B` / `lora_magnitude_vector`, which
diffusers hands to PEFT as a DoRA adapter. What cannot be expressed that way
(bias or norm deltas, DoRA decomposed on the input side, DoRA on only some
layers) is refused with LORA_LOAD_FAILED and why.
"""

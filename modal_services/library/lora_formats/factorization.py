"""A layer's weight delta rewritten as a plain LoRA (`lora_down`, `lora_up`, `alpha`).

Exactly where the delta's structure gives a low-rank factorisation (CP LoCon,
LoHa's Hadamard product of two low-rank matrices, LoKr's Kronecker product),
by SVD otherwise, truncated at `max_rank` with the relative error returned.
"""

from __future__ import annotations

import math

from modal_services.library.lora_formats.files import incompatible_model, lora_load_failed


def delta_to_lora(name: str, params: dict, target: tuple[int, ...], max_rank: int):
    """(down, up, alpha, relative error) for one layer, in the source's dtype, with the scale folded in."""
    import torch

    dtype = next(t.dtype for t in params.values() if t.dim() > 0)
    out_features, in_flat = target[0], math.prod(target[1:])
    kernel = target[2:]
    f32 = {key: tensor.float() for key, tensor in params.items()}
    alpha = f32.get("alpha")
    if "lora_down.weight" in f32:
        down, up = f32["lora_down.weight"], f32["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in f32:
            # CP LoCon: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1) → one (r, in, kh, kw) kernel.
            down = torch.einsum("rjhw,ji->rihw", f32["lora_mid.weight"], down.reshape(rank, -1))
        scale = (alpha.item() / rank) if alpha is not None else 1.0
        p, q = up.reshape(out_features, rank) * scale, down.reshape(rank, in_flat)
    elif "hada_w1_a" in f32:
        dim = f32["hada_w1_b"].shape[0]
        scale = (alpha.item() / dim) if alpha is not None else 1.0
        if "hada_t1" in f32:
            # CP-decomposed LoHa (conv): build the two full deltas, then their product.
            w1 = _rebuild_tucker(f32["hada_t1"], f32["hada_w1_a"], f32["hada_w1_b"])
            w2 = _rebuild_tucker(f32["hada_t2"], f32["hada_w2_a"], f32["hada_w2_b"])
            return _dense_to_lora((w1 * w2).reshape(out_features, in_flat) * scale, out_features, kernel, max_rank, dtype)
        p, q = _loha_factors(f32)
        p = p * scale
    elif "lokr_w1" in f32 or "lokr_w1_a" in f32:
        return _lokr_to_lora(name, f32, out_features, in_flat, kernel, max_rank, dtype)
    elif "diff" in f32:
        delta = f32["diff"].reshape(out_features, in_flat)
        return _dense_to_lora(delta, out_features, kernel, max_rank, dtype)
    else:
        raise lora_load_failed(f"The LoRA layer {name} has no weights.")
    if p.shape[0] != out_features or q.shape[1] != in_flat:
        raise incompatible_model(f"The LoRA layer {name} does not fit SDXL's shapes: it was made for another base model.")
    down, up, error = _compress(p, q, max_rank)
    return _finish(down, up, kernel, dtype, error)


def _loha_factors(f32: dict):
    """LoHa's ΔW = (A1·B1) ∘ (A2·B2) is exactly P·Q with P, Q the row-wise Kronecker products of the factors."""
    a1, b1 = f32["hada_w1_a"], f32["hada_w1_b"].reshape(f32["hada_w1_b"].shape[0], -1)
    a2, b2 = f32["hada_w2_a"], f32["hada_w2_b"].reshape(f32["hada_w2_b"].shape[0], -1)
    p = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)  # (out, r1·r2)
    q = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])  # (r1·r2, in)
    return p, q


def _rebuild_tucker(t, wa, wb):
    import torch

    # LyCORIS' CP form: t (r, r, kh, kw), wa (out, r), wb (r, in) → (out, in, kh, kw).
    return torch.einsum("ijhw,jr,ip->prhw", t, wb.reshape(wb.shape[0], -1), wa)


def _lokr_to_lora(name, f32, out_features, in_flat, kernel, max_rank, dtype):
    """LoKr's ΔW = kron(W1, W2): its SVD is the Kronecker product of the two small SVDs."""
    import torch

    w1 = f32["lokr_w1"] if "lokr_w1" in f32 else f32["lokr_w1_a"] @ f32["lokr_w1_b"]
    if "lokr_w2" in f32:
        w2 = f32["lokr_w2"]
    elif "lokr_t2" in f32:
        w2 = _rebuild_tucker(f32["lokr_t2"], f32["lokr_w2_a"], f32["lokr_w2_b"])
    else:
        w2 = f32["lokr_w2_a"] @ f32["lokr_w2_b"].reshape(f32["lokr_w2_b"].shape[0], -1)
    w2 = w2.reshape(w2.shape[0], -1)
    if w1.shape[0] * w2.shape[0] != out_features or w1.shape[1] * w2.shape[1] != in_flat:
        raise incompatible_model(f"The LoKr layer {name} does not fit SDXL's shapes: it was made for another base model.")
    # LyCORIS scales by alpha/dim only when a factor is decomposed (the dim is that factor's rank).
    dim = f32["lokr_w2_b"].shape[0] if "lokr_w2_b" in f32 else (f32["lokr_w1_b"].shape[0] if "lokr_w1_b" in f32 else None)
    alpha = f32.get("alpha")
    scale = alpha.item() / dim if (alpha is not None and dim) else 1.0
    u1, s1, v1 = torch.linalg.svd(w1, full_matrices=False)
    u2, s2, v2 = torch.linalg.svd(w2, full_matrices=False)
    products = (s1[:, None] * s2[None, :]).flatten() * abs(scale)
    order = torch.argsort(products, descending=True)
    keep = _rank_to_keep(products[order], max_rank)
    chosen = order[:keep]
    i, j = chosen // s2.shape[0], chosen % s2.shape[0]
    root = products[chosen].sqrt()
    sign = 1.0 if scale >= 0 else -1.0
    # Column k of kron(U1, U2) for the pair (i, j) is kron(u1[:, i], u2[:, j]).
    up = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(out_features, keep) * root * sign
    down = ((v1[i][:, :, None] * v2[j][:, None, :]).reshape(keep, in_flat)) * root[:, None]
    total = products.square().sum().sqrt()
    error = (products[order[keep:]].square().sum().sqrt() / total).item() if total > 0 else 0.0
    return _finish(down, up, kernel, dtype, error)


def _dense_to_lora(delta, out_features, kernel, max_rank, dtype):
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = _rank_to_keep(s, max_rank)
    root = s[:keep].sqrt()
    total = s.square().sum().sqrt()
    error = (s[keep:].square().sum().sqrt() / total).item() if total > 0 else 0.0
    return _finish(root[:, None] * vh[:keep], u[:, :keep] * root, kernel, dtype, error)


def _compress(p, q, max_rank):
    """P·Q (out×R, R×in) rewritten at its true rank (at most `max_rank`): two QRs and a small SVD."""
    import torch

    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T, full_matrices=False)
    keep = _rank_to_keep(s, max_rank)
    root = s[:keep].sqrt()
    total = s.square().sum().sqrt()
    error = (s[keep:].square().sum().sqrt() / total).item() if total > 0 else 0.0
    up = qp @ u[:, :keep] * root
    down = (root[:, None] * vh[:keep]) @ qq.T
    return down, up, error


def _rank_to_keep(singular_values, max_rank: int) -> int:
    """The numerical rank (values above 1e-6 of the largest), capped; at least 1."""
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 1
    significant = int((singular_values > singular_values[0] * 1e-6).sum().item())
    return max(1, min(significant, max_rank))


def _finish(down, up, kernel, dtype, error):
    import torch

    rank = down.shape[0]
    if kernel:
        down = down.reshape(rank, -1, *kernel)
        up = up.reshape(up.shape[0], rank, 1, 1)
    # alpha = rank: the scale is already folded into the factors.
    return down.contiguous().to(dtype), up.contiguous().to(dtype), torch.tensor(float(rank), dtype=dtype), error

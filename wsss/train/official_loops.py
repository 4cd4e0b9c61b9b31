"""Loop-style transcriptions of the official SeCo and CoBra losses, for benchmarking only (§3.8-§3.10, §4.6).

They compute what the official code computes, the way it computes it. SeCo ([SeCo] ``model/losses.py``): LIL one
anchor row at a time and LIG one crop at a time, with host syncs; PTC with the (B, N, N) pair mask built per image.
CoBra ([CoBra] ``loss_modules.py``): pseudo labels and top/bottom-k indices for the whole batch, per-image gathers
that build (B, N, k, D) key tensors, then a Python loop over the N = h*w anchor patches with one small batched
matmul per patch. The only change is device handling (no hard-coded ``.cuda()``). Names follow the paper (D1):
``official_sap_loop`` is ``cll_v1`` (assigned to the variable ``loss_CAP`` in the code), ``official_cap_loop`` is
``cll_v2``. :func:`official_losses` swaps them into a method's objective.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import cobra, seco
from .precision import float32


def official_sap_loop(
    v_s: torch.Tensor, m_cnn: torch.Tensor, labels: torch.Tensor, k_pos: int = 20, k_neg: int = 5, tau: float = 0.1
) -> torch.Tensor:
    """``cll_v1``, SAP in code mode: (4.11)-(4.12), exp before /tau in the negatives (D2), every patch an anchor.

    Args:
        v_s: (B, D, h, w) ViT patch projections ``v^s``.
        m_cnn: (B, C+1, h, w) raw CNN CAMs, channel 0 = background.
        labels: (B, C) multi-hot image labels ``y``.

    Returns:
        A (1,) tensor: the sum over batch, anchors and positives divided by ``h*w*B*k_pos``.
    """
    b, c1, h, w = m_cnn.shape
    n = h * w
    y_bg = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1).to(m_cnn.dtype)
    probs = torch.softmax(m_cnn * y_bg[:, :, None, None], dim=1)  # absent classes multiplied by 0 (D5)
    pseudo = probs.argmax(dim=1).reshape(b, n)  # first maximal channel on ties
    cam = m_cnn.reshape(b, c1, n)
    rows = torch.stack([cam[i, pseudo[i]] for i in range(b)])  # (B, N, N): raw CAM of each patch's pseudo class
    top = torch.topk(rows, k_pos, dim=-1, largest=True).indices
    bottom = torch.topk(rows, k_neg, dim=-1, largest=False).indices
    emb = v_s.reshape(b, v_s.shape[1], n).transpose(1, 2)  # (B, N, D)
    pos = torch.stack([emb[i, top[i]] for i in range(b)])  # (B, N, k_pos, D)
    neg = torch.stack([emb[i, bottom[i]] for i in range(b)])  # (B, N, k_neg, D)
    loss = torch.zeros(1, device=v_s.device, dtype=v_s.dtype)
    for i in range(n):
        anchor = emb[:, i].unsqueeze(-1)  # (B, D, 1)
        x = torch.exp((pos[:, i] @ anchor).squeeze(-1) / tau)
        y = (torch.exp((neg[:, i] @ anchor).squeeze(-1)) / tau).sum(-1, keepdim=True)
        loss = loss + (-torch.log(x / (x + y))).sum()
    return loss / (n * b * k_pos)


def official_cap_loop(
    v_c: torch.Tensor, affinity: torch.Tensor, k_pos: int = 5, k_neg: int = 20, tau: float = 0.1
) -> torch.Tensor:
    """``cll_v2``, CAP: (4.13)-(4.14) with the paper's exp(./tau), ranked by the patch affinity rows.

    Args:
        v_c: (B, D, h, w) CNN patch projections ``v^c``.
        affinity: (B, N, N) patch-to-patch attention ``P`` with the CLS row and column already dropped.

    Returns:
        A (1,) tensor: the sum over batch, anchors and positives divided by ``h*w*B*k_pos``.
    """
    b, d, h, w = v_c.shape
    n = h * w
    top = torch.topk(affinity, k_pos, dim=-1, largest=True).indices
    bottom = torch.topk(affinity, k_neg, dim=-1, largest=False).indices
    emb = v_c.reshape(b, d, n).transpose(1, 2)
    pos = torch.stack([emb[i, top[i]] for i in range(b)])
    neg = torch.stack([emb[i, bottom[i]] for i in range(b)])
    loss = torch.zeros(1, device=v_c.device, dtype=v_c.dtype)
    for i in range(n):
        anchor = emb[:, i].unsqueeze(-1)
        x = torch.exp((pos[:, i] @ anchor).squeeze(-1) / tau)
        y = torch.exp((neg[:, i] @ anchor).squeeze(-1) / tau).sum(-1, keepdim=True)
        loss = loss + (-torch.log(x / (x + y))).sum()
    return loss / (n * b * k_pos)


def lil_loop(q, k, f, g, tau=0.08, tau_base=0.08, impl="code"):
    """LIL as the official code computes it: one anchor row at a time, with host syncs."""
    n, m = q.shape[0], k.shape[0]
    logits = q @ k.t() / tau
    f = f.clone()
    total, z, rows = q.sum() * 0, 0, []
    for i in range(n):
        l = logits[i] - logits[i].max().detach()
        if f[i].item() == -1:
            rows.append(None)
            continue
        p = l * (g == f[i]).float()
        mean = p.mean()
        if (p < mean).sum().item() > 10 * ((p >= mean).sum().item() + 1e-6):
            f[i] = 0
            p = p * 0
        l = l * (g != -1).float()
        e = l.exp()
        e = e * (e != 1)
        rows.append((p.sum(), e.sum()))
        z += int((p != 0).sum().item())
    for row in rows:
        if row is None:
            continue
        r = row[0] - m * torch.log(row[1] + 1e-12)
        if z > 0 and row[1].item() > 0 and r.item() < 0:
            total = total + r / z
    return -(tau / tau_base) * total / n, f, None


def lig_loop(q, prototypes, f, tau=0.1, tau_base=0.1):
    present = sorted({int(t) for t in f.tolist() if t >= 1})
    total, count = q.sum() * 0, 0
    for i in range(q.shape[0]):
        c = int(f[i].item())
        if c < 1:
            continue
        count += 1
        l = q[i] @ prototypes.t() / tau
        den = sum(torch.exp(l[j - 1]) for j in present)
        total = total + l[c - 1] - torch.log(den + 1e-12)
    return -(tau / tau_base) * total / max(count, 1)


def aff_loop(label):
    out = []
    for b in range(label.shape[0]):
        flat = label[b].flatten()
        mask = (flat[:, None] == flat[None, :]).long()
        mask[flat == 255, :] = 255
        mask[:, flat == 255] = 255
        mask.fill_diagonal_(255)
        out.append(mask)
    return torch.stack(out)


def ptc_loop(feats, labels):
    """The official PTC: the (B, N, N) pair mask built per image, then masked |cos| sums (§3.10)."""
    aff = aff_loop(labels)
    tokens = torch.nn.functional.normalize(feats.flatten(2), dim=1, eps=1e-8)
    cos = (tokens.transpose(1, 2) @ tokens).abs()
    pos, neg = (aff == 1).float(), (aff == 0).float()
    return 0.5 * (1 - (cos * pos).sum() / (pos.sum() + 1)) + 0.5 * (cos * neg).sum() / (neg.sum() + 1)


def _patch_grid(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, D) tokens of a square patch grid, or (B, D, h, w) maps, as (B, D, h, w)."""
    if tokens.ndim == 4:
        return tokens
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _sap_official(v_s, m_cnn, labels, k_pos=20, k_neg=5, tau=0.1, *modes):
    """``sap_loss``'s signature on the official loop (which always runs the code's modes, D2-D5)."""
    return official_sap_loop(_patch_grid(v_s, m_cnn.shape[-2] * m_cnn.shape[-1]), m_cnn, labels, k_pos, k_neg,
                             tau).reshape(())  # fmt: skip


def _cap_official(v_c, affinity, k_pos=5, k_neg=20, tau=0.1, reduction="mean"):
    return official_cap_loop(_patch_grid(v_c, affinity.shape[-1]), affinity.detach(), k_pos, k_neg, tau).reshape(())


# method -> (module, {loss name in that module: loop-style replacement}), in the precision of ours (float32 where
# ours thresholds), so that only the form of the computation differs. CAM has no loss of its own to transcribe.
_SWAPS = {
    "seco": (seco, {"lil_loss": float32(lil_loop), "lig_loss": float32(lig_loop), "ptc_loss": ptc_loop}),
    "cobra": (cobra, {"sap_loss": float32(_sap_official), "cap_loss": _cap_official}),
}


def has_official_losses(method: str) -> bool:
    return method in _SWAPS


@contextmanager
def official_losses(method: str) -> Iterator[None]:
    """Within the block, ``method``'s objective computes its contrastive losses with the loop transcriptions."""
    module, swaps = _SWAPS.get(method, (None, {}))
    originals = {name: getattr(module, name) for name in swaps}
    for name, fn in swaps.items():
        setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)

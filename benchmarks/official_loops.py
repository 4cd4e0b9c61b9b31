"""Loop-style transcriptions of CoBra's official contrastive losses, for benchmarking only (§4.6).

They compute what [CoBra] ``loss_modules.py`` computes, the way it computes it: pseudo labels and top/bottom-k
indices for the whole batch, per-image gathers that build (B, N, k, D) key tensors, then a Python loop over the
N = h*w anchor patches with one small batched matmul per patch. The only change is device handling (no
hard-coded ``.cuda()``). Names follow the paper (D1): ``official_sap_loop`` is ``cll_v1`` (assigned to the
variable ``loss_CAP`` in the code), ``official_cap_loop`` is ``cll_v2``.
"""

from __future__ import annotations

import torch


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

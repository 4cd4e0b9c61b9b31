"""Top-k patch InfoNCE of CoBra's CAP and SAP losses (§4.5-§4.6, D2), fused forward and backward.

For an anchor patch ``i`` of image ``b`` with positives ``P_i+`` (``pos_idx[b, i]``) and negatives ``P_i-``
(``neg_idx[b, i]``), all indices into the same image's ``N`` patches::

    s_ij   = <v_i, v_j> / tau                                   X_ij = exp(s_ij)
    logY_i = logsumexp_{k in P_i-} <v_i, v_k> / tau             paper (4.8)-(4.10), (4.13):  Y_i = sum_k exp(s_ik)
    logY_i = logsumexp_{k in P_i-} <v_i, v_k> - log(tau)        code mode, cll_v1 (4.11), D2: Y_i = sum_k exp(t_ik)/tau
    L[b, i] = sum_{j in P_i+} softplus(logY_i - s_ij)           = sum_j -log(X_ij / (X_ij + Y_i))

The loss reduction (D3: mean or paper sum, anchor sets of D4) is the caller's; this returns ``L`` (B, N).

Two implementations share the contract:

* ``patch_infonce_reference``: vectorised PyTorch. It gathers the similarities from the (B, N, N) Gram matrix
  ``v v^T`` (cheaper than gathering (B, N, k, D) key tensors) and lets autograd do the backward.
* the Triton path: one program per block of anchors keeps the anchor rows in registers and streams the positive
  and negative key rows past them one index column at a time (no (B, N, k, D) gather and no (B, N, N) matrix);
  the k similarities per anchor and the log-sum-exp stay in registers. The forward saves only the (B, N, Kp+Kn)
  similarities and the log-sum-exp; the backward reloads the key rows, accumulates the anchor gradient and
  scatters the key gradients with fp32 atomic adds (summation order, hence the last bits, is not deterministic).

Inputs may be fp32, fp16 or bf16; similarities and sums are accumulated in fp32, the output is fp32 and the
gradient comes back in ``v``'s dtype.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .dispatch import backend_for, check_launch, triton_module

triton = triton_module()
if triton is not None:
    import triton.language as tl

NEG_MODES = ("paper", "code")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TILE = 4096  # anchor rows x padded feature width per register tile (4 such tiles live in the backward)


def patch_infonce(
    v: torch.Tensor,
    pos_idx: torch.Tensor,
    neg_idx: torch.Tensor,
    tau: float,
    neg_mode: str = "paper",
    backend: str | None = None,
) -> torch.Tensor:
    """Per-anchor top-k InfoNCE ``L`` (B, N) float32 (module docstring), differentiable in ``v``.

    float64 ``v`` stays float64 on the reference path (for oracles); the Triton path takes fp32/fp16/bf16.

    Args:
        v: (B, N, D) patch projections ``v^c`` or ``v^s`` (normally L2-normalised; not normalised here).
        pos_idx: (B, N, Kp) integer indices of ``P_i+``; neg_idx: (B, N, Kn) indices of ``P_i-`` (Kp, Kn >= 1).
        tau: temperature ``tau`` (> 0).
        neg_mode: ``"paper"`` (exp(<v_i, v_k>/tau)) or ``"code"`` (cll_v1's exp(<v_i, v_k>)/tau, D2).
        backend: ``"triton"``, ``"torch"`` or None (automatic, see ``wsss.kernels.dispatch``).
    """
    pos_idx, neg_idx = _check_inputs(v, pos_idx, neg_idx, tau, neg_mode)
    if backend_for(v, pos_idx, neg_idx, backend=backend) == "triton":
        if v.dtype in TRITON_DTYPES:
            return _PatchInfoNCE.apply(v, pos_idx, neg_idx, float(tau), neg_mode)
        if backend == "triton":
            raise TypeError(f"the Triton path takes float32, float16 or bfloat16 v, got {v.dtype}")
    return _reference(v, pos_idx, neg_idx, tau, neg_mode)


def patch_infonce_reference(
    v: torch.Tensor, pos_idx: torch.Tensor, neg_idx: torch.Tensor, tau: float, neg_mode: str = "paper"
) -> torch.Tensor:
    """The PyTorch reference and CPU path: similarities gathered from the Gram matrix ``v v^T``."""
    return _reference(v, *_check_inputs(v, pos_idx, neg_idx, tau, neg_mode), tau, neg_mode)


def _reference(v, pos_idx, neg_idx, tau, neg_mode) -> torch.Tensor:
    vf = v.to(torch.promote_types(v.dtype, torch.float32))
    gram = vf @ vf.transpose(1, 2)  # <v_i, v_j>, (B, N, N)
    s = gram.gather(2, pos_idx) / tau
    t = gram.gather(2, neg_idx)
    log_y = (t / tau).logsumexp(-1) if neg_mode == "paper" else t.logsumexp(-1) - math.log(tau)
    return F.softplus(log_y[..., None] - s).sum(-1)


def _check_inputs(v, pos_idx, neg_idx, tau, neg_mode) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes, dtypes, devices and index ranges; return the indices as contiguous int64."""
    if v.dim() != 3 or not v.is_floating_point():
        raise ValueError(f"v must be a floating (B, N, D) tensor, got {v.dtype} of shape {tuple(v.shape)}")
    if neg_mode not in NEG_MODES:
        raise ValueError(f"neg_mode must be 'paper' or 'code', got {neg_mode!r}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    b, n, _ = v.shape
    checked = []
    for name, idx in (("pos_idx", pos_idx), ("neg_idx", neg_idx)):
        if idx.dim() != 3 or idx.shape[:2] != (b, n) or idx.shape[2] < 1:
            raise ValueError(f"{name} must be ({b}, {n}, k >= 1) for v of shape {tuple(v.shape)}, got "
                             f"{tuple(idx.shape)}")  # fmt: skip
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer indices, got {idx.dtype}")
        if idx.device != v.device:
            raise ValueError(f"{name} is on {idx.device} but v is on {v.device}")
        # The range check is free on the CPU; on the GPU it would cost a host sync every training step, so there
        # the indices (which come from top-k rankings) are trusted unless WSSS_CHECK_INDICES=1.
        if (not idx.is_cuda or os.environ.get("WSSS_CHECK_INDICES") == "1") and bool(((idx < 0) | (idx >= n)).any()):
            raise IndexError(f"{name} holds indices outside [0, {n})")
        checked.append(idx.to(torch.int64).contiguous())
    return checked[0], checked[1]


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): the whole feature row in one tile, as many anchors as fit ``MAX_TILE``;
    full tiles get 8 warps (ptxas for sm_90, D <= 1024: at most 24 bytes of stack, 230 registers)."""
    block_d = max(16, 1 << (d - 1).bit_length())
    block_m = max(1, min(32, MAX_TILE // block_d))
    return block_m, block_d, (8 if block_m * block_d >= MAX_TILE else 4)


def _mode_constants(tau: float, neg_mode: str) -> tuple[float, float]:
    """(scale of the negative logits, shift of logY): paper (1/tau, 0); code (1, -log tau)."""
    return (1.0 / tau, 0.0) if neg_mode == "paper" else (1.0, -math.log(tau))


class _PatchInfoNCE(torch.autograd.Function):
    """Triton forward/backward; saves the (B, N, Kp) and (B, N, Kn) similarities and the negatives' LSE."""

    @staticmethod
    def forward(ctx, v, pos_idx, neg_idx, tau: float, neg_mode: str):
        v = v.contiguous()
        b, n, d = v.shape
        kp, kn = pos_idx.shape[2], neg_idx.shape[2]
        neg_scale, shift = _mode_constants(tau, neg_mode)
        loss = torch.empty(b, n, device=v.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        s_pos = torch.empty(b, n, kp, device=v.device, dtype=torch.float32)
        a_neg = torch.empty(b, n, kn, device=v.device, dtype=torch.float32)
        block_m, block_d, warps = _blocks(d)
        grid = (-(-n // block_m), b)
        check_launch(_forward_kernel, v)
        _forward_kernel[grid](v, pos_idx, neg_idx, loss, lse, s_pos, a_neg, n, d, kp, kn, 1.0 / tau, neg_scale,
                              shift, KP_PAD=_pow2(kp), KN_PAD=_pow2(kn), BLOCK_M=block_m, BLOCK_D=block_d,
                              num_warps=warps)  # fmt: skip
        ctx.save_for_backward(v, pos_idx, neg_idx, s_pos, a_neg, lse)
        ctx.constants = (1.0 / tau, neg_scale, shift)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        v, pos_idx, neg_idx, s_pos, a_neg, lse = ctx.saved_tensors
        inv_tau, neg_scale, shift = ctx.constants
        b, n, d = v.shape
        kp, kn = pos_idx.shape[2], neg_idx.shape[2]
        grad_v = torch.zeros(b, n, d, device=v.device, dtype=torch.float32)
        block_m, block_d, warps = _blocks(d)
        grid = (-(-n // block_m), b)
        grad_loss = grad_loss.float().contiguous()
        _backward_kernel[grid](v, pos_idx, neg_idx, s_pos, a_neg, lse, grad_loss, grad_v, n, d, kp, kn, inv_tau,
                               neg_scale, shift, KP_PAD=_pow2(kp), KN_PAD=_pow2(kn), BLOCK_M=block_m,
                               BLOCK_D=block_d, num_warps=warps)  # fmt: skip
        return grad_v.to(v.dtype), None, None, None, None


def _pow2(x: int) -> int:
    return max(2, 1 << (x - 1).bit_length())


if triton is not None:

    @triton.jit
    def _forward_kernel(v, pos_idx, neg_idx, loss, lse, s_pos, a_neg, N, D, KP, KN, inv_tau, neg_scale, shift,
                        KP_PAD: tl.constexpr, KN_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):  # fmt: skip
        # rows = anchors i of image b; the anchor tile stays in registers while key rows stream past it
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        flat = tl.program_id(1).to(tl.int64) * N + rows
        cols = tl.arange(0, BLOCK_D)
        tile_ok = row_ok[:, None] & (cols < D)[None, :]
        v_i = tl.load(v + flat[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        kp_cols = tl.arange(0, KP_PAD)
        s = tl.zeros((BLOCK_M, KP_PAD), dtype=tl.float32)
        for c in range(KP):  # s_ij = <v_i, v_j> / tau, one positive column at a time
            j = tl.load(pos_idx + flat * KP + c, mask=row_ok, other=0)
            v_j = tl.load(v + (flat - rows + j)[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
            dot = tl.sum(v_i * v_j.to(tl.float32), axis=1) * inv_tau
            s = tl.where(kp_cols[None, :] == c, dot[:, None], s)
        kn_cols = tl.arange(0, KN_PAD)
        a = tl.zeros((BLOCK_M, KN_PAD), dtype=tl.float32)
        for c in range(KN):  # negative logits: <v_i, v_k> / tau (paper) or <v_i, v_k> (code)
            k = tl.load(neg_idx + flat * KN + c, mask=row_ok, other=0)
            v_k = tl.load(v + (flat - rows + k)[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
            dot = tl.sum(v_i * v_k.to(tl.float32), axis=1) * neg_scale
            a = tl.where(kn_cols[None, :] == c, dot[:, None], a)
        kn_ok = (kn_cols < KN)[None, :]
        a_max = tl.max(tl.where(kn_ok, a, float("-inf")), axis=1)
        lse_i = a_max + tl.log(tl.sum(tl.where(kn_ok, tl.exp(a - a_max[:, None]), 0.0), axis=1))
        x = (lse_i + shift)[:, None] - s  # logY_i - s_ij
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e  # log1p(e) without cancellation: log(u) * e / (u - 1), or e when u rounds to 1
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
        softplus = tl.maximum(x, 0.0) + log1p_e
        kp_ok = (kp_cols < KP)[None, :]
        tl.store(loss + flat, tl.sum(tl.where(kp_ok, softplus, 0.0), axis=1), mask=row_ok)
        tl.store(lse + flat, lse_i, mask=row_ok)
        tl.store(s_pos + flat[:, None] * KP + kp_cols[None, :], s, mask=row_ok[:, None] & kp_ok)
        tl.store(a_neg + flat[:, None] * KN + kn_cols[None, :], a, mask=row_ok[:, None] & kn_ok)

    @triton.jit
    def _backward_kernel(v, pos_idx, neg_idx, s_pos, a_neg, lse, grad_loss, grad_v, N, D, KP, KN, inv_tau,
                         neg_scale, shift, KP_PAD: tl.constexpr, KN_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        flat = tl.program_id(1).to(tl.int64) * N + rows
        cols = tl.arange(0, BLOCK_D)
        tile_ok = row_ok[:, None] & (cols < D)[None, :]
        kp_cols = tl.arange(0, KP_PAD)
        kn_cols = tl.arange(0, KN_PAD)
        kp_ok = row_ok[:, None] & (kp_cols < KP)[None, :]
        kn_ok = row_ok[:, None] & (kn_cols < KN)[None, :]
        g = tl.load(grad_loss + flat, mask=row_ok, other=0.0)
        lse_i = tl.load(lse + flat, mask=row_ok, other=0.0)
        s = tl.load(s_pos + flat[:, None] * KP + kp_cols[None, :], mask=kp_ok, other=0.0)
        a = tl.load(a_neg + flat[:, None] * KN + kn_cols[None, :], mask=kn_ok, other=0.0)
        # dL/dlogY = sum_j sigmoid(logY - s_ij); dL/ds_ij = -sigmoid(logY - s_ij); dlogY/da_k = softmax(a)_k
        x = (lse_i + shift)[:, None] - s
        e = tl.exp(-tl.abs(x))  # sigmoid(x) without overflow: 1/(1+e) for x >= 0, e/(1+e) below
        sig = tl.where(kp_ok, tl.where(x >= 0, 1.0, e) / (1.0 + e), 0.0)
        c_pos = -(g * inv_tau)[:, None] * sig  # dL/d<v_i, v_j>
        p = tl.where(kn_ok, tl.exp(a - lse_i[:, None]), 0.0)
        c_neg = (g * tl.sum(sig, axis=1) * neg_scale)[:, None] * p  # dL/d<v_i, v_k>
        v_i = tl.load(v + flat[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for c in range(KP):
            coef = tl.sum(tl.where(kp_cols[None, :] == c, c_pos, 0.0), axis=1)[:, None]
            key = flat - rows + tl.load(pos_idx + flat * KP + c, mask=row_ok, other=0)
            v_j = tl.load(v + key[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            acc += coef * v_j
            tl.atomic_add(grad_v + key[:, None] * D + cols[None, :], coef * v_i, mask=tile_ok)
        for c in range(KN):
            coef = tl.sum(tl.where(kn_cols[None, :] == c, c_neg, 0.0), axis=1)[:, None]
            key = flat - rows + tl.load(neg_idx + flat * KN + c, mask=row_ok, other=0)
            v_k = tl.load(v + key[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            acc += coef * v_k
            tl.atomic_add(grad_v + key[:, None] * D + cols[None, :], coef * v_i, mask=tile_ok)
        tl.atomic_add(grad_v + flat[:, None] * D + cols[None, :], acc, mask=tile_ok)

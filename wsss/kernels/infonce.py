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
* the Triton path: one program per block of anchors streams the positive and negative key rows past the anchor
  rows, ``BLOCK_D`` features at a time (no (B, N, k, D) gather, no (B, N, N) matrix, no padding of D); the k
  similarities per anchor and the log-sum-exp stay in registers. The forward saves only the (B, N, Kp+Kn)
  similarities and the log-sum-exp. The backward turns them into the coefficients ``c_ij = dL/d<v_i, v_j>``
  (PyTorch, elementwise) and forms ``dL/dv_r = sum_{(r, j)} c_rj v_j + sum_{(i, r)} c_ir v_i`` row by row: a stable
  sort of the indices lists each row's terms (its own slots, then its uses as a key, in anchor order) and one
  program per (row, feature chunk) adds them one after the other. No atomics: SAP's shared key rows, used by
  every anchor of a class, cost one list each instead of N same-address atomic adds, and the gradient has the
  same bits on every run and with every autotuned config.

Inputs may be fp32, fp16 or bf16; similarities and sums are accumulated in fp32, the output is fp32 and the
gradient comes back in ``v``'s dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import backend_for, triton_module
from .utils import autotune, check_grid, check_launch, check_range

triton = triton_module()
if triton is not None:
    import triton.language as tl

NEG_MODES = ("paper", "code")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_D = 64  # features per chunk of the forward dot products; fixed, as it sets their summation order


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
    """Validate shapes, dtypes, devices and index ranges; return the indices as contiguous int64.

    Indices outside [0, N) raise ``IndexError`` on the CPU; on a GPU the check runs without a host sync and a
    failure is a device-side assert, a ``RuntimeError`` at the next synchronisation (``utils.check_range``).
    """
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
        check_range(name, idx, 0, n)
        checked.append(idx.to(torch.int64).contiguous())
    return checked[0], checked[1]


def _mode_constants(tau: float, neg_mode: str) -> tuple[float, float]:
    """(scale of the negative logits, shift of logY): paper (1/tau, 0); code (1, -log tau)."""
    return (1.0 / tau, 0.0) if neg_mode == "paper" else (1.0, -math.log(tau))


def _pow2(x: int) -> int:
    return max(2, 1 << (x - 1).bit_length())


def forward_grid(n: int, b: int, block_m: int) -> tuple[int, int]:
    """One program per block of ``block_m`` anchors (axis 0) of each image (axis 1)."""
    return check_grid((-(-n // block_m), b))


def gather_grid(rows: int, d: int, block_d: int) -> tuple[int, int]:
    """One program per gradient row (axis 0, up to 2^31 - 1) and chunk of ``block_d`` features (axis 1)."""
    return check_grid((rows, -(-d // block_d)))


def similarity_grads(grad_loss, s_pos, a_neg, lse, inv_tau: float, neg_scale: float, shift: float) -> torch.Tensor:
    """``c = dL/d<v_i, v_j>`` for the positive then the negative slots, (B, N, Kp + Kn) float32.

    ``dL/ds_ij = -sigmoid(logY_i - s_ij)``, ``dL/dlogY_i = sum_j sigmoid(logY_i - s_ij)``, ``dlogY_i/da_ik =
    softmax(a_i)_k``, with ``s = <v_i, v_j> / tau`` and ``a = <v_i, v_k> * neg_scale``.
    """
    g = grad_loss.float()[..., None]
    sig = torch.sigmoid((lse + shift)[..., None] - s_pos)
    c_neg = g * sig.sum(-1, keepdim=True) * neg_scale * torch.exp(a_neg - lse[..., None])
    return torch.cat([-(g * inv_tau) * sig, c_neg], -1)


def gradient_lists(idx: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The terms of ``dL/dv_r = sum_{(r, j)} c_rj v_j + sum_{(i, r)} c_ir v_i`` grouped by row ``r``, per image.

    Args:
        idx: (B, N, K) key indices of every anchor's slots; coef: (B, N, K) their coefficients ``c``.

    Returns:
        offsets (B, N + 1) int32 (row r's terms are ``[offsets[r], offsets[r + 1])``), sources (B, 2 N K) int32
        (the row each term multiplies) and weights (B, 2 N K) float32, sorted by row and, within a row, its own
        slots first, then its uses as a key in anchor order (a stable sort: the same order on every run).
    """
    b, n, k = idx.shape
    anchors = torch.arange(n, device=idx.device, dtype=torch.int32)[:, None].expand(n, k).reshape(1, n * k)
    keys = idx.reshape(b, n * k).to(torch.int32)
    anchors = anchors.expand(b, -1)
    rows, order = torch.sort(torch.cat([anchors, keys], 1), dim=1, stable=True)
    sources = torch.cat([keys, anchors], 1).gather(1, order)
    weights = coef.reshape(b, n * k).repeat(1, 2).gather(1, order)
    bounds = torch.arange(n + 1, device=idx.device, dtype=torch.int32).repeat(b, 1)
    return torch.searchsorted(rows, bounds, out_int32=True), sources, weights


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
        check_launch(_forward_kernel, v)
        _forward_kernel[lambda meta: forward_grid(n, b, meta["BLOCK_M"])](
            v, pos_idx, neg_idx, loss, lse, s_pos, a_neg, n, d, kp, kn, 1.0 / tau, neg_scale, shift,
            KP_PAD=_pow2(kp), KN_PAD=_pow2(kn), BLOCK_D=BLOCK_D)  # fmt: skip
        ctx.save_for_backward(v, pos_idx, neg_idx, s_pos, a_neg, lse)
        ctx.constants = (1.0 / tau, neg_scale, shift)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        v, pos_idx, neg_idx, s_pos, a_neg, lse = ctx.saved_tensors
        b, n, d = v.shape
        coef = similarity_grads(grad_loss, s_pos, a_neg, lse, *ctx.constants)
        offsets, sources, weights = gradient_lists(torch.cat([pos_idx, neg_idx], 2), coef)
        grad_v = torch.empty_like(v)
        _gather_sum_kernel[lambda meta: gather_grid(b * n, d, meta["BLOCK_D"])](
            v, offsets, sources, weights, grad_v, n, d, sources.shape[1])  # fmt: skip
        return grad_v, None, None, None, None


if triton is not None:
    # BLOCK_M >= 4 num_warps keeps the lanes along D, hence each dot product's summation tree, the same in every
    # config (fp32 and half loads alike); the gather kernel adds its terms in list order whatever its blocks
    FORWARD_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in ((32, 4), (16, 4), (64, 4), (64, 8))]
    GATHER_CONFIGS = [triton.Config({"BLOCK_E": e, "BLOCK_D": bd}, num_warps=w)
                      for e, bd, w in ((8, 256, 2), (16, 128, 1), (8, 256, 2), (32, 64, 1), (16, 256, 4))]  # fmt: skip

    @triton.jit
    def _add_dots(acc, v_i, image, idx, flat, row_ok, cols, tile_ok, D, K, K_PAD: tl.constexpr):
        """``acc[:, c] += <v_i, v_key>`` over one feature chunk, for the K index columns c of ``idx``."""
        slots = tl.arange(0, K_PAD)
        for c in range(K):
            key = tl.load(idx + flat * K + c, mask=row_ok, other=0)
            v_k = tl.load(image + key[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            acc += tl.where(slots[None, :] == c, tl.sum(v_i * v_k, axis=1)[:, None], 0.0)
        return acc

    @triton.jit
    def _column(x, c, K_PAD: tl.constexpr):
        """Column ``c`` of a (rows, K_PAD) tile, exactly (one value plus zeros)."""
        return tl.sum(tl.where(tl.arange(0, K_PAD)[None, :] == c, x, 0.0), axis=1)

    @triton.jit
    def _softplus(x):
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e  # log1p(e) without cancellation: log(u) * e / (u - 1), or e when u rounds to 1
        return tl.maximum(x, 0.0) + tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))

    @autotune(FORWARD_CONFIGS, key=["N", "D", "KP", "KN"])
    @triton.jit
    def _forward_kernel(v, pos_idx, neg_idx, loss, lse, s_pos, a_neg, N, D, KP, KN, inv_tau, neg_scale, shift,
                        KP_PAD: tl.constexpr, KN_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):  # fmt: skip
        # rows = anchors i of image b; key rows stream past the anchor rows one feature chunk at a time
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        b = tl.program_id(1).to(tl.int64)
        flat = b * N + rows
        image = v + b * N * D
        s = tl.zeros((BLOCK_M, KP_PAD), dtype=tl.float32)
        a = tl.zeros((BLOCK_M, KN_PAD), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            tile_ok = row_ok[:, None] & (cols < D)[None, :]
            v_i = tl.load(v + flat[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            s = _add_dots(s, v_i, image, pos_idx, flat, row_ok, cols, tile_ok, D, KP, KP_PAD)
            a = _add_dots(a, v_i, image, neg_idx, flat, row_ok, cols, tile_ok, D, KN, KN_PAD)
        s = s * inv_tau  # s_ij = <v_i, v_j> / tau
        a = a * neg_scale  # <v_i, v_k> / tau (paper) or <v_i, v_k> (code)
        kp_cols = tl.arange(0, KP_PAD)
        kn_cols = tl.arange(0, KN_PAD)
        a_max = tl.max(tl.where((kn_cols < KN)[None, :], a, float("-inf")), axis=1)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in range(KN):  # the slots one after the other: no summation tree that a config could change
            total += tl.exp(_column(a, c, KN_PAD) - a_max)
        lse_i = a_max + tl.log(total)
        loss_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in range(KP):
            loss_i += _softplus(lse_i + shift - _column(s, c, KP_PAD))  # softplus(logY_i - s_ij)
        tl.store(loss + flat, loss_i, mask=row_ok)
        tl.store(lse + flat, lse_i, mask=row_ok)
        tl.store(s_pos + flat[:, None] * KP + kp_cols[None, :], s, mask=row_ok[:, None] & (kp_cols < KP)[None, :])
        tl.store(a_neg + flat[:, None] * KN + kn_cols[None, :], a, mask=row_ok[:, None] & (kn_cols < KN)[None, :])

    @autotune(GATHER_CONFIGS, key=["N", "D", "E"])
    @triton.jit
    def _gather_sum_kernel(v, offsets, sources, weights, out, N, D, E, BLOCK_E: tl.constexpr,
                           BLOCK_D: tl.constexpr):  # fmt: skip
        """``out[b, r] = sum_e weights[b, e] v[b, sources[b, e]]`` over ``e`` in ``[offsets[b, r], offsets[b, r+1])``,
        one term after the other in list order (the same bits for every block size and warp count)."""
        row = tl.program_id(0).to(tl.int64)  # b * N + r
        b = row // N
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        start = tl.load(offsets + row + b)
        end = tl.load(offsets + row + b + 1)
        image = v + b * N * D
        terms = b * E
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            for e in tl.static_range(BLOCK_E):  # unrolled: BLOCK_E row loads in flight; past the end adds 0 * 0
                ok = e0 + e < end
                w = tl.load(weights + terms + e0 + e, mask=ok, other=0.0)
                src = tl.load(sources + terms + e0 + e, mask=ok, other=0).to(tl.int64)
                x = tl.load(image + src * D + cols, mask=col_ok & ok, other=0.0)
                acc += w * x.to(tl.float32)
        tl.store(out + row * D + cols, acc.to(out.dtype.element_ty), mask=col_ok)

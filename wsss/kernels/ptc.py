"""SeCo/ToCo masked patch-token contrast, PTC of §3.10 and (3.18), fused forward and backward.

With ``F_hat = F_tok / ||F_tok||`` (eps 1e-8) along channels and ``Ccos_ij = |<F_hat_i, F_hat_j>|``::

    L_PTC = 1/2 (1 - sum_{R=1} Ccos / (#{R=1} + 1)) + 1/2 sum_{R=0} Ccos / (#{R=0} + 1)

where the pair mask ``R`` of (1.7) (``label_to_aff_mask``) is 1 for same-label pairs, 0 for different-label pairs
and ignored (255) for pairs touching an ignored token and on the diagonal. Sums and counts run over the whole
batch. No (B, N, N) mask is built here: pair counts come from per-image label histograms (sort + searchsorted),
and the pair classes are recomputed from the labels wherever a similarity is formed.

* ``masked_ptc_reference``: PyTorch. It still forms the (B, N, N) ``|cos|`` matrix (the absolute value does not
  factor through a matmul) but replaces the int64 mask by one-hot label matmuls.
* the Triton path: the forward tiles the upper triangle of (i, j) token blocks (the matrix is symmetric, so an
  off-diagonal tile counts twice) and writes one partial sum pair per tile, reduced in float64 by PyTorch. The
  backward gives each program one row block: it sweeps the column blocks, forms each similarity tile once and
  adds ``dL/dF_hat_i = 2 sum_j c_ij sign(<F_hat_i, F_hat_j>) F_hat_j`` to its own rows in place (no atomics,
  deterministic). Neither holds (B, N, N); the normalisation stays in PyTorch, whose autograd covers it.

The tiles are fixed by ``_tiles``, not autotuned: the token block sets the summation order of both passes (the
per-tile partial sums, the column sweep of the backward), so a timed choice would make the bits depend on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import backend_for, triton_module
from .utils import check_grid, check_launch, check_range

triton = triton_module()
if triton is not None:
    import triton.language as tl

IGNORE_INDEX = 255
L2_EPS = 1e-8  # of the token L2 normalisation
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def masked_ptc(feats: torch.Tensor, labels: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``L_PTC`` (3.18) as a 0-dim float32 tensor (float64 for float64 features), differentiable in ``feats``.

    Args:
        feats: (B, D, N) or (B, D, h, w) final-layer tokens ``F_tok``.
        labels: (B, N) or (B, h, w) integer token labels ``l_aux`` in [0, 255] (255 = ignore), from the aux CAM;
            others raise ``ValueError`` on the CPU, a device-side assert on a GPU (``utils.check_range``).
        backend: ``"triton"``, ``"torch"`` or None (automatic, see ``wsss.kernels.dispatch``).

    Pairs of tokens with an ignored label and the diagonal never count; with no valid pair at all the loss is
    the formula's value at zero counts, 0.5.
    """
    tokens, flat = _check_inputs(feats, labels)
    if backend_for(feats, labels, backend=backend) == "triton":
        if feats.dtype in TRITON_DTYPES:
            n_pos, n_neg = pair_counts(flat)
            t = F.normalize(tokens.float(), dim=1, eps=L2_EPS).contiguous()  # autograd covers the normalisation
            return _MaskedPTC.apply(t, flat.contiguous(), n_pos, n_neg)
        if backend == "triton":
            raise TypeError(f"the Triton path takes float32, float16 or bfloat16 features, got {feats.dtype}")
    return _reference(tokens, flat)


def masked_ptc_reference(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The PyTorch reference and CPU path of ``masked_ptc``."""
    return _reference(*_check_inputs(feats, labels))


def pair_counts(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(#{R=1}, #{R=0}) as int64 tensors from (B, N) labels, without a (B, N, N) mask or a host sync.

    Per image, ``sum_c n_c^2`` counts the ordered same-label pairs of valid tokens (diagonal included):
    ``#{R=1} = sum_c n_c^2 - n_valid`` and ``#{R=0} = n_valid^2 - sum_c n_c^2``.
    """
    ordered = labels.sort(dim=1).values
    same_run = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
    valid = labels != IGNORE_INDEX
    squares = (same_run * valid).sum()  # each valid token adds the size of its own class
    n_valid = valid.sum(1)
    return squares - n_valid.sum(), (n_valid * n_valid).sum() - squares


def _check_inputs(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return (B, D, N) tokens and (B, N) int64 labels."""
    if feats.dim() not in (3, 4) or not feats.is_floating_point():
        raise ValueError(f"feats must be a floating (B, D, N) or (B, D, h, w) tensor, got {feats.dtype} "
                         f"of shape {tuple(feats.shape)}")  # fmt: skip
    if labels.dim() not in (2, 3) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer (B, N) or (B, h, w) tensor, got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")  # fmt: skip
    tokens, flat = feats.flatten(2), labels.flatten(1)
    if flat.shape != (tokens.shape[0], tokens.shape[2]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match the token grid of feats {tuple(feats.shape)}")
    if labels.device != feats.device:
        raise ValueError(f"labels are on {labels.device} but feats on {feats.device}")
    check_range("labels (class ids, 255 = ignore)", flat, 0, IGNORE_INDEX + 1, ValueError)
    return tokens, flat.to(torch.int64)


def _reference(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    t = F.normalize(tokens.to(torch.promote_types(tokens.dtype, torch.float32)), dim=1, eps=L2_EPS)
    gram = t.transpose(1, 2) @ t  # (B, N, N); bmm keeps its inputs for backward, so the diagonal can be cleared
    gram.diagonal(dim1=1, dim2=2).zero_()
    cos = gram.abs()
    valid = (labels != IGNORE_INDEX).to(cos.dtype)
    classes, inverse = torch.unique(labels, return_inverse=True)
    onehot = F.one_hot(inverse, len(classes)).to(cos.dtype) * valid[..., None]  # (B, N, U), ignored rows 0
    per_class = cos @ onehot  # sum_{j valid, l_j = u} |cos_ij|
    s_pos = (per_class * onehot).sum()
    s_neg = (per_class * (valid[..., None] - onehot)).sum()  # every term >= 0: no cancellation
    n_pos, n_neg = pair_counts(labels)
    return _combine(s_pos, s_neg, n_pos, n_neg)


def _combine(s_pos, s_neg, n_pos, n_neg) -> torch.Tensor:
    """(3.18) from the two sums and the two counts."""
    return 0.5 * (1 - s_pos / (n_pos.to(s_pos.dtype) + 1)) + 0.5 * s_neg / (n_neg.to(s_neg.dtype) + 1)


def _tiles(n: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCK_D, num_warps): square token tiles, the feature chunk per dot, warps per program.

    Chosen so that neither kernel spills registers on sm_90 (ptxas: at most 196 registers, no stack).
    """
    return (32, 32, 4) if n <= 256 else (64, 16, 8)


class _MaskedPTC(torch.autograd.Function):
    """Triton PTC on unit tokens ``t`` (B, D, N) float32; gradient with respect to ``t``."""

    @staticmethod
    def forward(ctx, t, labels, n_pos, n_neg):
        b, d, n = t.shape
        block, block_d, warps = _tiles(n)
        n_blocks = -(-n // block)
        pairs = torch.triu_indices(n_blocks, n_blocks, device=t.device).t().to(torch.int32).contiguous()
        partial = torch.empty(b, pairs.shape[0], 2, device=t.device, dtype=torch.float32)
        check_launch(_forward_kernel, t)
        _forward_kernel[check_grid((pairs.shape[0], b))](t, labels, pairs, partial, n, d, BLOCK=block, BLOCK_D=block_d,
                                             num_warps=warps)  # fmt: skip
        sums = partial.double().sum((0, 1))
        ctx.save_for_backward(t, labels, n_pos, n_neg)
        return _combine(sums[0], sums[1], n_pos, n_neg).float()

    @staticmethod
    def backward(ctx, grad_loss):
        t, labels, n_pos, n_neg = ctx.saved_tensors
        b, d, n = t.shape
        block, block_d, warps = _tiles(n)
        g = grad_loss.float()
        # dL/dS_pos = -1/(2(n_pos+1)), dL/dS_neg = 1/(2(n_neg+1)); each unordered pair appears twice in S
        coef = torch.stack([-g / (n_pos.float() + 1), g / (n_neg.float() + 1)]).contiguous()
        grad_t = torch.zeros_like(t)
        _backward_kernel[check_grid((-(-n // block), b))](t, labels, coef, grad_t, n, d, BLOCK=block, BLOCK_D=block_d,
                                                          num_warps=warps)  # fmt: skip
        return grad_t, None, None, None


if triton is not None:

    @triton.jit
    def _similarity_tile(t_img, rows, cols, N, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """<t_i, t_j> for a (BLOCK, BLOCK) tile of one image's (D, N) unit tokens, fp32 (IEEE) dot products."""
        gram = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            t_i = tl.load(t_img + dims[None, :] * N + rows[:, None],
                          mask=(rows < N)[:, None] & (dims < D)[None, :], other=0.0)  # fmt: skip
            t_j = tl.load(t_img + dims[:, None] * N + cols[None, :],
                          mask=(dims < D)[:, None] & (cols < N)[None, :], other=0.0)  # fmt: skip
            gram += tl.dot(t_i, t_j, input_precision="ieee")
        return gram

    @triton.jit
    def _pair_classes(labels_img, rows, cols, N):
        """(valid off-diagonal pair, same label) masks of a tile; tokens past N read as ignored."""
        l_i = tl.load(labels_img + rows, mask=rows < N, other=255)
        l_j = tl.load(labels_img + cols, mask=cols < N, other=255)
        valid = (l_i != 255)[:, None] & (l_j != 255)[None, :] & (rows[:, None] != cols[None, :])
        return valid, l_i[:, None] == l_j[None, :]

    @triton.jit
    def _forward_kernel(t, labels, pairs, partial, N, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        tile = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        bi = tl.load(pairs + 2 * tile)
        bj = tl.load(pairs + 2 * tile + 1)
        rows = bi * BLOCK + tl.arange(0, BLOCK)
        cols = bj * BLOCK + tl.arange(0, BLOCK)
        cos = tl.abs(_similarity_tile(t + b * D * N, rows, cols, N, D, BLOCK, BLOCK_D))
        valid, same = _pair_classes(labels + b * N, rows, cols, N)
        weight = tl.where(bi == bj, 1.0, 2.0)  # an off-diagonal tile stands for its mirror image too
        s_pos = tl.sum(tl.sum(tl.where(valid & same, cos, 0.0), axis=1), axis=0) * weight
        s_neg = tl.sum(tl.sum(tl.where(valid & ~same, cos, 0.0), axis=1), axis=0) * weight
        out = partial + (b * tl.num_programs(0) + tile) * 2
        tl.store(out, s_pos)
        tl.store(out + 1, s_neg)

    @triton.jit
    def _backward_kernel(t, labels, coef, grad_t, N, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program owns the gradient rows of one token block and sweeps every column block once: the
        # similarity tile is formed once per (i, j) block, the rows are updated in place chunk by chunk over D
        b = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        c_pos = tl.load(coef)
        c_neg = tl.load(coef + 1)
        t_img = t + b * D * N
        g_img = grad_t + b * D * N
        for j0 in range(0, N, BLOCK):
            cols = j0 + tl.arange(0, BLOCK)
            gram = _similarity_tile(t_img, rows, cols, N, D, BLOCK, BLOCK_D)
            valid, same = _pair_classes(labels + b * N, rows, cols, N)
            c = tl.where(valid, tl.where(same, c_pos, c_neg), 0.0)
            c = tl.where(gram > 0, c, tl.where(gram < 0, -c, 0.0))  # d|x|/dx = sign(x), 0 at 0
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                t_j = tl.load(t_img + dims[None, :] * N + cols[:, None],
                              mask=(cols < N)[:, None] & (dims < D)[None, :], other=0.0)  # fmt: skip
                out = g_img + dims[None, :] * N + rows[:, None]
                out_ok = (rows < N)[:, None] & (dims < D)[None, :]
                grad = tl.load(out, mask=out_ok, other=0.0) + tl.dot(c, t_j, input_precision="ieee")
                tl.store(out, grad, mask=out_ok)
            tl.debug_barrier()  # this block's stores are visible before the next column block reads them

"""CAM post-processing in one pass: flip merge, scale sum, normalisation, optional CoBra fusion, labels.

Per source (``cams``, and ``cams2`` when given), with every map already resized to (H, W) and flips aligned:

* (1.3)/(1.4) SeCo: ``M = sum_s ReLU(max(A_s, A'_s))`` (``flip_merge="max"``); §4.8, (4.17) CoBra:
  ``M = sum_s ReLU(A_s) + ReLU(A'_s)`` (``flip_merge="sum"``);
* (1.5) ``norm="minmax"``: ``M <- (M - min_p M) / (max_p(M - min_p M) + 1e-5)`` per (b, k); (4.17) ``norm="max"``:
  ``M <- M / (max_p M + 1e-5)``;
* with ``cams2``, the two sources combined by ``combine``: ``"fuse"`` is (4.19) ``M_fuse = max((M1 + M2) / 2, M2)``,
  ``"avg"`` ``(M1 + M2) / 2``, ``"max"`` ``max(M1, M2)`` (CoBra's Table 5), ``M1`` from ``cams`` (CNN), ``M2`` from
  ``cams2`` (ViT);
* (1.6) ``V = y * M``; ``label = argmax_k V + 1`` (first index on ties), ``0`` where ``max_k V <= bkg`` (the
  background wins ties), ``conf = max(max_k V, bkg)``. ``bkg`` is a threshold ``tau_bkg`` or per-image background
  scores (B,) such as CoBra's attention percentile ``b(theta)`` (4.20).

The Triton path makes one reduction pass for the per-(b, k) extrema and one elementwise pass writing label,
confidence and, on request, the normalised maps; the (S, F) stack is read twice and no intermediate map is
stored. Both grids are one-dimensional (planes x pixel blocks on axis 0, up to 2^31 - 1 programs), and the pixel
block and warp count are autotuned: every config gives the same bits (min, max and elementwise operations).
Inference only: nothing here is differentiable.
"""

from __future__ import annotations

import torch

from .dispatch import backend_for, triton_module
from .utils import autotune, check_grid, check_launch

triton = triton_module()
if triton is not None:
    import triton.language as tl

NORM_EPS = 1e-5  # (1.5), (4.17)
FLIP_MERGES = ("max", "sum")
NORMS = ("minmax", "max")
COMBINES = ("fuse", "avg", "max")
MIN_BLOCK = 512  # the smallest pixel block of the autotuned configs: it sizes the partial extrema


@torch.no_grad()
def cam_postprocess(
    cams: torch.Tensor,
    tags: torch.Tensor,
    bkg: float | torch.Tensor,
    flip_merge: str = "max",
    norm: str = "minmax",
    cams2: torch.Tensor | None = None,
    return_cams: bool = False,
    backend: str | None = None,
    combine: str = "fuse",
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Fused CAM -> (normalised maps or None, label, confidence) (module docstring).

    Args:
        cams: (S, F, B, K, H, W) CAMs of S scales and F = 1 or 2 aligned flips, resized to (H, W).
        tags: (B, K) multi-hot image labels ``y``.
        bkg: background threshold (float) or per-image background scores, a (B,) tensor.
        flip_merge: ``"max"`` (SeCo) or ``"sum"`` (CoBra).
        norm: ``"minmax"`` (SeCo: (1.5)) or ``"max"`` (CoBra: (4.17)).
        cams2: optional second source (the ViT CAMs of CoBra), same shape, combined by ``combine``.
        return_cams: also return the normalised (fused) maps (B, K, H, W) float32.
        backend: ``"triton"``, ``"torch"`` or None (automatic, see ``wsss.kernels.dispatch``).
        combine: ``"fuse"`` (4.19), ``"avg"`` or ``"max"``.

    Returns:
        (maps or None, label (B, H, W) int64, conf (B, H, W) float32).
    """
    bkg_t = _check_inputs(cams, tags, bkg, flip_merge, norm, cams2, combine)
    inputs = [t for t in (cams, tags, cams2) if t is not None]
    if backend_for(*inputs, backend=backend) == "torch":
        return _reference(cams, tags, bkg_t, flip_merge, norm, cams2, return_cams, combine)
    return _triton(cams, tags, bkg_t, flip_merge, norm, cams2, return_cams, combine)


def cam_postprocess_reference(
    cams: torch.Tensor,
    tags: torch.Tensor,
    bkg: float | torch.Tensor,
    flip_merge: str = "max",
    norm: str = "minmax",
    cams2: torch.Tensor | None = None,
    return_cams: bool = False,
    combine: str = "fuse",
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The PyTorch reference and CPU path of ``cam_postprocess``."""
    bkg_t = _check_inputs(cams, tags, bkg, flip_merge, norm, cams2, combine)
    with torch.no_grad():
        return _reference(cams, tags, bkg_t, flip_merge, norm, cams2, return_cams, combine)


def normalize_maps(m: torch.Tensor, norm: str = "minmax") -> torch.Tensor:
    """Per-channel normalisation over the spatial axes: (1.5) min-max to [0, 1), or (4.17) ``M / (max M + eps)``."""
    if norm == "minmax":
        m = m - m.amin(dim=(-2, -1), keepdim=True)
    return m / (m.amax(dim=(-2, -1), keepdim=True) + NORM_EPS)


def combine_sources(m1: torch.Tensor, m2: torch.Tensor, combine: str = "fuse") -> torch.Tensor:
    """Two normalised sources as one map: ``"fuse"`` (4.19) ``max((M1 + M2) / 2, M2)``, which equals the code's
    ``(max(M1, M2) + M2) / 2`` (D14); ``"avg"``; ``"max"``."""
    if combine == "fuse":
        return torch.maximum((m1 + m2) / 2, m2)
    if combine == "avg":
        return (m1 + m2) / 2
    if combine == "max":
        return torch.maximum(m1, m2)
    raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


def _check_inputs(cams, tags, bkg, flip_merge, norm, cams2, combine) -> torch.Tensor:
    """Validate; return the background as a (B,) float32 tensor on the CAMs' device."""
    if cams.dim() != 6 or not cams.is_floating_point() or cams.shape[1] not in (1, 2):
        raise ValueError(f"cams must be a floating (S, F, B, K, H, W) tensor with F = 1 or 2, got {cams.dtype} of "
                         f"shape {tuple(cams.shape)}")  # fmt: skip
    if cams2 is not None and (cams2.shape != cams.shape or not cams2.is_floating_point()):
        raise ValueError(f"cams2 must be floating with the shape of cams {tuple(cams.shape)}, got {cams2.dtype} "
                         f"of shape {tuple(cams2.shape)}")  # fmt: skip
    b, k = cams.shape[2:4]
    if tags.shape != (b, k):
        raise ValueError(f"tags must be (B, K) = ({b}, {k}), got {tuple(tags.shape)}")
    if flip_merge not in FLIP_MERGES:
        raise ValueError(f"flip_merge must be 'max' or 'sum', got {flip_merge!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be 'minmax' or 'max', got {norm!r}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    for name, t in (("tags", tags), ("cams2", cams2), ("bkg", bkg)):
        if isinstance(t, torch.Tensor) and t.device != cams.device:
            raise ValueError(f"{name} is on {t.device} but cams on {cams.device}")
    if isinstance(bkg, torch.Tensor):
        if bkg.shape != (b,):
            raise ValueError(f"a tensor bkg must hold one score per image, shape ({b},), got {tuple(bkg.shape)}")
        return bkg.to(torch.float32)
    return torch.full((b,), float(bkg), dtype=torch.float32, device=cams.device)


def _reference(cams, tags, bkg, flip_merge, norm, cams2, return_cams, combine="fuse"):
    m = _merged(cams, flip_merge, norm)
    if cams2 is not None:
        m = combine_sources(m, _merged(cams2, flip_merge, norm), combine)
    valid = tags[:, :, None, None].to(m.dtype) * m  # (1.6) V
    value, idx = valid.max(dim=1)  # the first maximal index on ties
    bkg = bkg[:, None, None]
    label = torch.where(value <= bkg, 0, idx + 1)
    return (m if return_cams else None), label, torch.maximum(value, bkg)


def _merged(cams: torch.Tensor, flip_merge: str, norm: str) -> torch.Tensor:
    """(S, F, B, K, H, W) -> normalised (B, K, H, W) float32: ReLU, flip merge, scale sum (in scale order)."""
    a = cams.float().relu()
    per_scale = a.amax(1) if flip_merge == "max" else a.sum(1)
    m = per_scale[0]
    for s in range(1, per_scale.shape[0]):  # in scale order, like the fused kernel
        m = m + per_scale[s]
    return normalize_maps(m, norm)


def _triton(cams, tags, bkg, flip_merge, norm, cams2, return_cams, combine="fuse"):
    s, f, b, k, h, w = cams.shape
    hw = h * w
    fuse = cams2 is not None
    cams = cams.contiguous()
    cams2 = cams2.contiguous() if fuse else cams
    lo, hi = _extrema(cams, flip_merge)
    lo2, hi2 = _extrema(cams2, flip_merge) if fuse else (lo, hi)
    if norm == "max":  # M / (max M + eps): no shift
        lo, lo2 = torch.zeros_like(lo), torch.zeros_like(lo2)
    label = torch.empty(b, h, w, device=cams.device, dtype=torch.int64)
    conf = torch.empty(b, h, w, device=cams.device, dtype=torch.float32)
    out = torch.empty(b, k, h, w, device=cams.device, dtype=torch.float32) if return_cams else conf
    _label_kernel[lambda meta: pixel_grid(b, hw, meta["BLOCK"])](
        cams, cams2, lo, hi, lo2, hi2, tags.float().contiguous(), bkg.contiguous(), label, conf, out, s, f, b, k, hw,
        NORM_EPS, MAX_MERGE=flip_merge == "max", FUSE=fuse, COMBINE=COMBINES.index(combine),
        WRITE_CAMS=return_cams)  # fmt: skip
    return (out if return_cams else None), label, conf


def _extrema(cams: torch.Tensor, flip_merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(b, k) min and max over the pixels of the merged map ``M``: per-block partials, then one reduction.

    The partials are sized for the smallest block; a larger block leaves the extra columns at +-inf."""
    s, f, b, k, h, w = cams.shape
    hw = h * w
    part_lo = torch.full((b * k, -(-hw // MIN_BLOCK)), float("inf"), device=cams.device, dtype=torch.float32)
    part_hi = torch.full_like(part_lo, float("-inf"))
    check_launch(_extrema_kernel, cams)
    _extrema_kernel[lambda meta: pixel_grid(b * k, hw, meta["BLOCK"])](
        cams, part_lo, part_hi, s, f, b * k, hw, part_lo.shape[1], MAX_MERGE=flip_merge == "max")  # fmt: skip
    return part_lo.amin(1).contiguous(), part_hi.amax(1).contiguous()


def pixel_grid(units: int, hw: int, block: int) -> tuple[int]:
    """One program per block of ``block`` pixels of each of ``units`` planes or images, all on grid axis 0 (CUDA
    allows 2^31 - 1 programs there, 65535 on the other axes)."""
    return check_grid((units * -(-hw // block),))


if triton is not None:
    CONFIGS = [triton.Config({"BLOCK": blk}, num_warps=w) for blk, w in ((1024, 4), (512, 4), (2048, 8), (1024, 8))]

    @triton.jit
    def _merged_block(cams, plane, pix, ok, S, F, PLANES, HW, MAX_MERGE: tl.constexpr):
        """M at a block of pixels of one (b, k) plane: sum over scales of the ReLU'd, merged flips (fp32)."""
        m = tl.zeros(pix.shape, dtype=tl.float32)
        for s in range(S):
            a = tl.zeros(pix.shape, dtype=tl.float32)  # 0 + x and max(0, x) are exactly x for x >= 0
            for fl in range(F):
                x = tl.load(cams + ((s * F + fl) * PLANES + plane) * HW + pix, mask=ok, other=0.0)
                x = tl.maximum(x.to(tl.float32), 0.0)
                a = tl.maximum(a, x) if MAX_MERGE else a + x
            m = m + a  # scales in order, like the reference
        return m

    @autotune(CONFIGS, key=["S", "F", "PLANES", "HW"])
    @triton.jit
    def _extrema_kernel(cams, part_lo, part_hi, S, F, PLANES, HW, PART_COLS, MAX_MERGE: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
        blocks = tl.cdiv(HW, BLOCK)
        plane = (tl.program_id(0) // blocks).to(tl.int64)
        block = tl.program_id(0) % blocks
        pix = block * BLOCK + tl.arange(0, BLOCK)
        ok = pix < HW
        m = _merged_block(cams, plane, pix, ok, S, F, PLANES, HW, MAX_MERGE)
        out = plane * PART_COLS + block
        tl.store(part_lo + out, tl.min(tl.where(ok, m, float("inf")), axis=0))
        tl.store(part_hi + out, tl.max(tl.where(ok, m, float("-inf")), axis=0))

    @autotune(CONFIGS, key=["S", "F", "B", "K", "HW"])
    @triton.jit
    def _label_kernel(cams, cams2, lo, hi, lo2, hi2, tags, bkg, label, conf, out, S, F, B, K, HW, eps,
                      MAX_MERGE: tl.constexpr, FUSE: tl.constexpr, COMBINE: tl.constexpr,
                      WRITE_CAMS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        blocks = tl.cdiv(HW, BLOCK)
        b = (tl.program_id(0) // blocks).to(tl.int64)
        pix = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
        ok = pix < HW
        best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        arg = tl.zeros((BLOCK,), dtype=tl.int64)
        for k in range(K):
            plane = b * K + k
            # IEEE division (plain `/` is approximate on GPUs): the same bits as the reference, so ties tie
            low = tl.load(lo + plane)
            m = _merged_block(cams, plane, pix, ok, S, F, B * K, HW, MAX_MERGE) - low
            m = tl.math.div_rn(m, tl.zeros_like(m) + (tl.load(hi + plane) - low + eps))
            if FUSE:
                low2 = tl.load(lo2 + plane)
                m2 = _merged_block(cams2, plane, pix, ok, S, F, B * K, HW, MAX_MERGE) - low2
                m2 = tl.math.div_rn(m2, tl.zeros_like(m2) + (tl.load(hi2 + plane) - low2 + eps))
                if COMBINE == 0:
                    m = tl.maximum((m + m2) * 0.5, m2)  # (4.19); halving is exact
                elif COMBINE == 1:
                    m = (m + m2) * 0.5
                else:
                    m = tl.maximum(m, m2)
            if WRITE_CAMS:
                tl.store(out + plane * HW + pix, m, mask=ok)
            v = tl.load(tags + plane) * m
            better = v > best  # strict: the first class keeps a tie
            arg = tl.where(better, k + 1, arg)
            best = tl.where(better, v, best)
        background = tl.load(bkg + b)
        tl.store(label + b * HW + pix, tl.where(best <= background, 0, arg), mask=ok)
        tl.store(conf + b * HW + pix, tl.maximum(best, background), mask=ok)

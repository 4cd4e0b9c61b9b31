"""IRN inference (§6.3, §6.5, §6.8; CoBra's variant §4.9-§4.10): IR labels, pair paths, affinities, random walk.

Pixels live on the stride-4 grid of the edge map. A pixel ``s`` is linked to every ``d = s + (dy, dx)`` within the
search radius on one half-plane (§6.5). The affinity of a pair is one minus the strongest boundary on the lattice path
between them (6.3)/(6.7); the random walk (6.8)-(6.9) diffuses CAMs along these affinities.

Shapes: ``(C, h, w)`` CAM / random-walk planes hold the image's *present* foreground classes, and ``keys`` (C + 1,)
maps plane index ``k`` to a class id, with ``keys[0] == 0`` the background (as in :func:`crf_from_labels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..data.palette import IGNORE_INDEX
from .crf import CRF_PRESETS, crf_from_labels

# ------------------------------------------------------------------------------------------------------ path index


@dataclass(frozen=True)
class PathGroup:
    """Directions whose paths have the same number of points ``L``."""

    dir_ids: np.ndarray  # (n,) indices into PathIndex.directions
    offsets: np.ndarray  # (n, L, 2) (y, x) path points, destination first, source (0, 0) last
    flat: np.ndarray  # (n, L) the same offsets as flat indices on the (h, w) grid


@dataclass(frozen=True)
class PathIndex:
    """Search directions, their lattice paths and the source/destination pixels on an (h, w) grid (§6.5)."""

    radius: float
    size: tuple[int, int]
    directions: np.ndarray  # (D, 2) (dy, dx), in the order of the rule: (0, x) first, then rows y = 1..r_f
    paths: tuple[np.ndarray, ...]  # per direction (L_d, 2), sorted by descending |y| + |x|
    groups: tuple[PathGroup, ...]  # directions grouped by path length (ascending)
    src: np.ndarray  # (S,) flat indices of the source pixels [0, h - r_f) x [r_f, w - r_f)
    dst: np.ndarray  # (D, S) flat indices of each source's destination per direction
    _tensors: dict = field(default_factory=dict, repr=False, compare=False)

    def tensor(self, array: np.ndarray, device: torch.device | str) -> torch.Tensor:
        """One of this index's (read-only) arrays as a torch tensor on ``device``, cached."""
        key = (id(array), str(device))
        if key not in self._tensors:
            self._tensors[key] = torch.from_numpy(array.copy()).to(device)
        return self._tensors[key]

    @property
    def radius_floor(self) -> int:
        return math.ceil(self.radius) - 1

    @property
    def src_shape(self) -> tuple[int, int]:
        """(rows, cols) of the source crop."""
        r_f = self.radius_floor
        return self.size[0] - r_f, self.size[1] - 2 * r_f


def search_directions(radius: float) -> np.ndarray:
    """§6.5: ``(0, x)`` for ``x = 1..r_f`` and ``(y, x)`` for ``y = 1..r_f``, ``|x| <= r_f``, ``x^2 + y^2 < r^2``."""
    r_f = math.ceil(radius) - 1
    if r_f < 1:
        raise ValueError(f"radius must exceed 1 to link any pixels, got {radius}")
    first = [(0, x) for x in range(1, r_f + 1)]
    rest = [(y, x) for y in range(1, r_f + 1) for x in range(-r_f, r_f + 1) if x * x + y * y < radius * radius]
    return np.array(first + rest, dtype=np.int64)


def direction_paths(directions: np.ndarray) -> list[np.ndarray]:
    """Lattice points of each direction's bounding box at squared perpendicular distance < 1 from the segment.

    The test ``(dy*x - dx*y)^2 < dy^2 + dx^2`` is exact in integers. Points are sorted by descending
    ``|y| + |x|`` (stable over row-major order), so the destination comes first and the source (0, 0) last.
    """
    r = int(np.abs(directions).max())
    ys, xs = np.meshgrid(np.arange(0, r + 1), np.arange(-r, r + 1), indexing="ij")
    grid = np.stack([ys.ravel(), xs.ravel()], axis=1)  # (K, 2), row-major
    dy, dx = directions[:, :1], directions[:, 1:]  # (D, 1)
    y, x = grid[None, :, 0], grid[None, :, 1]  # (1, K)
    in_box = (y >= np.minimum(dy, 0)) & (y <= np.maximum(dy, 0)) & (x >= np.minimum(dx, 0)) & (x <= np.maximum(dx, 0))
    near = (dy * x - dx * y) ** 2 < dy**2 + dx**2
    order = np.argsort(-np.abs(grid).sum(1), kind="stable")
    keep = (in_box & near)[:, order]
    return [grid[order][k] for k in keep]


@lru_cache(maxsize=32)
def path_index(radius: float, size: tuple[int, int]) -> PathIndex:
    """Directions, paths grouped by length, and source/destination pixels for an (h, w) grid (§6.5).

    Sources are the crop ``[0, h - r_f) x [r_f, w - r_f)`` with ``r_f = ceil(r) - 1``, so every destination
    ``s + (dy, dx)`` stays on the grid. Cached: the result is read-only.
    """
    h, w = (int(v) for v in size)
    directions = search_directions(radius)
    r_f = math.ceil(radius) - 1
    if h <= r_f or w <= 2 * r_f:
        raise ValueError(f"a {h}x{w} grid is too small for radius {radius}: need h > {r_f} and w > {2 * r_f}")
    paths = direction_paths(directions)
    lengths = np.array([len(p) for p in paths])
    groups = []
    for length in np.unique(lengths):
        ids = np.flatnonzero(lengths == length)
        offsets = np.stack([paths[i] for i in ids])
        groups.append(PathGroup(ids, offsets, offsets[..., 0] * w + offsets[..., 1]))
    rows, cols = np.meshgrid(np.arange(h - r_f), np.arange(r_f, w - r_f), indexing="ij")
    src = (rows * w + cols).ravel()
    dst = src[None, :] + (directions[:, 0] * w + directions[:, 1])[:, None]
    for a in (directions, src, dst, *paths, *(x for g in groups for x in (g.dir_ids, g.offsets, g.flat))):
        a.setflags(write=False)
    return PathIndex(float(radius), (h, w), directions, tuple(paths), tuple(groups), src, dst)


def path_max(values: torch.Tensor, pidx: PathIndex) -> torch.Tensor:
    """``max_{k in path(s -> d)} values_k`` for every source ``s`` and direction: (B, h, w) -> (B, D, S).

    Differentiable (the gradient goes to the arg-max, as in the paper). One gather per path-length group.
    """
    if values.ndim != 3 or tuple(values.shape[-2:]) != pidx.size:
        raise ValueError(f"expected values of shape (B, {pidx.size[0]}, {pidx.size[1]}), got {tuple(values.shape)}")
    flat, dev = values.flatten(1), values.device
    src = pidx.tensor(pidx.src, dev)
    out = values.new_empty(values.shape[0], len(pidx.directions), len(pidx.src))
    for g in pidx.groups:
        idx = pidx.tensor(g.flat, dev)[:, :, None] + src  # (n, L, S)
        out[:, pidx.tensor(g.dir_ids, dev)] = flat[:, idx].max(dim=2).values
    return out


# ------------------------------------------------------------------------------------------- affinity, random walk


def edge_to_affinity(edge: torch.Tensor, radius: float = 5) -> torch.Tensor:
    """Dense affinity (6.7) ``a_ij = 1 - max_{k in path(i -> j)} E_k`` within the radius, 0 beyond it.

    ``edge`` is an (h, w) or (B, 1, h, w) boundary probability map (``E_inf``). Following the reference, it is padded
    by ``r`` on the left, right and bottom with 1 (padding cuts affinity), pair affinities are computed on the padded
    grid and the pairs between real pixels are kept. The result is symmetric with a unit diagonal:
    (n, n) or (B, n, n) with ``n = h * w`` (row-major pixels), float32.
    """
    batched = edge.ndim == 4
    if not (edge.ndim == 2 or (batched and edge.shape[1] == 1)):
        raise ValueError(f"expected an edge map of shape (h, w) or (B, 1, h, w), got {tuple(edge.shape)}")
    e = edge.float() if batched else edge.float()[None, None]
    b, _, h, w = e.shape
    pad = math.ceil(radius)
    pidx = path_index(radius, (h + pad, w + 2 * pad))
    aff = 1 - path_max(F.pad(e, (pad, pad, 0, pad), value=1.0)[:, 0], pidx)  # (B, D, S) on the padded grid
    i, j, keep = _unpad_pairs(pidx, h, w, pad, e.device)
    n = h * w
    dense = torch.zeros(b, n, n, dtype=torch.float32, device=e.device)
    vals = aff.flatten(1)[:, keep]
    dense[:, i, j] = vals
    dense[:, j, i] = vals
    dense[:, torch.arange(n, device=e.device), torch.arange(n, device=e.device)] = 1.0
    return dense if batched else dense[0]


def _unpad_pairs(pidx: PathIndex, h: int, w: int, pad: int, device) -> tuple[torch.Tensor, ...]:
    """Source/destination pixel indices on the unpadded (h, w) grid of the padded pairs that lie inside it."""
    wp = pidx.size[1]
    src = np.broadcast_to(pidx.src, pidx.dst.shape).ravel()
    dst = pidx.dst.ravel()
    sy, sx, dy, dx = src // wp, src % wp - pad, dst // wp, dst % wp - pad
    keep = (sy < h) & (dy < h) & (sx >= 0) & (sx < w) & (dx >= 0) & (dx < w)
    arrays = (sy[keep] * w + sx[keep], dy[keep] * w + dx[keep], np.flatnonzero(keep))
    return tuple(torch.from_numpy(a).to(device) for a in arrays)


def transition_matrix(affinity: torch.Tensor, beta: float = 10, exp_times: int = 8) -> torch.Tensor:
    """(6.8) ``T = A^{∘beta} / colsum(A^{∘beta})``, then ``T <- T @ T`` ``exp_times`` times (``T^(2^exp_times)``).

    Works on (n, n) or batched (B, n, n) fp32 matrices. Cost: ``exp_times`` dense GEMMs of ``2 n^3`` FLOPs each and
    ``4 n^2`` bytes per matrix (quirk Q6.1: a 500x375 image has n = 11 750, 0.55 GB per matrix, ~3.2 TFLOP per
    squaring), so run it on a GPU for real images.
    """
    t = affinity.float().pow(beta)
    t = t / t.sum(dim=-2, keepdim=True)
    for _ in range(exp_times):
        t = t @ t
    return t


def random_walk(
    cam: torch.Tensor, edge: torch.Tensor, beta: float = 10, exp_times: int = 8, radius: float = 5
) -> torch.Tensor:
    """(6.8)-(6.9) ``rw = (cam * (1 - E)) @ T``: CAMs (C, h, w) diffused along edge-derived affinities.

    ``cam`` is the stride-4, max-normalised CAM of the present classes and ``edge`` the (h, w) ``E_inf`` of the
    same image. Returns (C, h, w) float32. Dense and O(n^3) in ``n = h*w`` (see :func:`transition_matrix`).
    """
    if cam.ndim != 3 or edge.ndim != 2 or cam.shape[-2:] != edge.shape:
        raise ValueError(f"expected cam (C, h, w) and edge (h, w) of the same size, got {tuple(cam.shape)} and "
                         f"{tuple(edge.shape)}")  # fmt: skip
    c, h, w = cam.shape
    trans = transition_matrix(edge_to_affinity(edge, radius), beta, exp_times)
    x = (cam.float().to(edge.device) * (1 - edge.float())).reshape(c, h * w)
    return (x @ trans).reshape(c, h, w)


# ------------------------------------------------------------------------------------------------------------ masks


def _check_keys(planes: int, keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64)
    if keys.ndim != 1 or len(keys) != planes + 1 or keys[0] != 0:
        raise ValueError(f"keys must be (C + 1,) = ({planes + 1},) class ids starting with background 0, got {keys}")
    return keys


def irn_mask(rw: torch.Tensor, size: tuple[int, int], keys: np.ndarray, bg: float = 0.25) -> np.ndarray:
    """IRN's mask rule (§6.8): x4 bilinear upsampling, crop to ``size``, global-max division, bg plane, argmax.

    ``rw`` (C, h, w) -> uint8 (H, W) class ids. A map that is zero everywhere is left undivided (all background).
    """
    keys = _check_keys(rw.shape[0], keys)
    height, width = size
    if rw.ndim != 3 or 4 * rw.shape[1] < height or 4 * rw.shape[2] < width:
        raise ValueError(f"rw of shape {tuple(rw.shape)} does not cover a {height}x{width} image at stride 4")
    up = F.interpolate(rw[None].float(), scale_factor=4, mode="bilinear", align_corners=False)[0, :, :height, :width]
    peak = up.max() if up.numel() else up.new_tensor(0.0)
    up = up / peak if peak > 0 else up
    scores = F.pad(up, (0, 0, 0, 0, 1, 0), value=bg)
    return keys[scores.argmax(0).cpu().numpy()].astype(np.uint8)


def cobra_mask(
    rw: torch.Tensor, size: tuple[int, int], keys: np.ndarray, factor: float = 0.31, image: np.ndarray | None = None
) -> np.ndarray:
    """CoBra's mask rule (§4.10): resize to ``size``, (4.22) per-class threshold, argmax over [0, rw], label CRF.

    (4.22) ``thr_c = factor * max_p rw_c + min_p rw_c`` and ``rw_c(p) <- 0`` below it; background wins where every
    class is zeroed. With ``image`` (H, W, 3 uint8) the label CRF of row D (``CRF_PRESETS["cobra"]``) follows.
    Returns uint8 (H, W) class ids.
    """
    keys = _check_keys(rw.shape[0], keys)
    if rw.ndim != 3:
        raise ValueError(f"expected rw of shape (C, h, w), got {tuple(rw.shape)}")
    if image is not None and image.shape[:2] != tuple(size):
        raise ValueError(f"image is {image.shape[:2]} but the mask size is {tuple(size)}")
    up = F.interpolate(rw[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    flat = up.flatten(1)
    thr = factor * flat.amax(1) + flat.amin(1)  # (4.22)
    up = torch.where(up < thr[:, None, None], torch.zeros_like(up), up)
    label = keys[F.pad(up, (0, 0, 0, 0, 1, 0), value=0.0).argmax(0).cpu().numpy()].astype(np.uint8)
    return label if image is None else crf_from_labels(image, label, keys, CRF_PRESETS["cobra"])


def ir_labels(
    image: np.ndarray, cams_hr: np.ndarray, keys: np.ndarray, t_fg: float, t_bg: float, crf: bool = True
) -> np.ndarray:
    """Inter-pixel relation labels (6.1)-(6.2); IRN uses ``t_fg, t_bg = 0.30, 0.05``, CoBra (4.21)'s thresholds.

    (6.1) ``fg = CRF_C(argmax[t_fg, CAM])`` and ``bg = CRF_C(argmax[t_bg, CAM])`` with the label CRF of row C
    (``crf=False`` skips it). (6.2) ``ir = fg``; 255 where ``fg = 0``; 0 where ``fg = 0`` and ``bg = 0``.
    ``cams_hr`` is (C, H, W) for the present classes; thresholds are cast to the CAM dtype (float32).
    Returns uint8 (H, W) with 255 = unsure.
    """
    cams = np.asarray(cams_hr, dtype=np.float32)
    keys = _check_keys(cams.shape[0], keys)
    if cams.ndim != 3 or cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams_hr {cams.shape} must be (C, H, W) with the image's size {image.shape[:2]}")

    def confident(threshold: float) -> np.ndarray:
        plane = np.full((1, *cams.shape[1:]), threshold, dtype=np.float32)
        label = keys[np.concatenate([plane, cams]).argmax(0)].astype(np.uint8)
        return crf_from_labels(image, label, keys, CRF_PRESETS["seed"]) if crf else label

    fg, bg = confident(t_fg), confident(t_bg)
    ir = fg.copy()
    ir[fg == 0] = IGNORE_INDEX
    ir[(fg == 0) & (bg == 0)] = 0
    return ir

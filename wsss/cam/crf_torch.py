"""Dense CRF in torch (§5), batched on the CPU or a GPU: pydensecrf's model and its permutohedral lattice.

The filter is the lattice pydensecrf builds (Adams et al. 2010 as written in Krähenbühl's densecrf 2.2): the same
feature scaling, rounding, simplex ranks, barycentric weights, blur order and ``alpha``; only the hash table is
replaced by a sort of integer-coded vertex keys, so the vertex numbering differs and nothing else. The marginals
then match pydensecrf's up to float summation order, which is what makes the argmax agree (``tests/test_crf_torch.py``
bounds it by ``PYDENSECRF_AGREEMENT``). :class:`ExactFilter`, the exact Gaussian ``exp(-|f_i - f_j|^2 / 2)`` with
the self term, is the plain O(N^2) reference of the model on tiny images.

A batch is one flat list of pixels: the image index is the most significant digit of every vertex key, so images of
any size share one lattice without padding and never exchange messages. Labels are padded to the batch's largest
label count; padded labels have zero marginal and so send no message (the filter is linear per label).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .crf import CRF_PRESETS, CRFParams

Images = Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor
Filter = Callable[[torch.Tensor], torch.Tensor]
SOFTMAX_CLIP = 1e-5  # unary_from_softmax's clip (5.3)
EXACT_MAX_PIXELS = 4096  # the exact reference holds an N x N kernel


class Lattice:
    """pydensecrf's permutohedral lattice over ``features`` (d, N) float32; ``groups`` (N,) keeps images apart.

    Built coordinate-major, (d+1, N), so each step is a loop over the few coordinates on contiguous rows. Splat
    and slice are sparse CSR matrices (M x N and N x M, d+1 entries per pixel): no atomics, so a filter is
    deterministic on a GPU too. The blur gathers each vertex's two neighbours along each of the d+1 axes in turn.
    """

    def __init__(self, features: torch.Tensor, groups: torch.Tensor) -> None:
        self.d = features.shape[0]
        self._matrices(*self._simplices(features, groups))

    def _simplices(self, features: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pixel's enclosing simplex: (d+1, N) vertex codes and barycentric weights (its temporaries die here)."""
        d, n = features.shape
        elevated = self._elevate(features)
        down = torch.round(elevated * np.float32(1.0 / (d + 1)))  # nearest 0-coloured point, ties to even
        rem0 = down * (d + 1)
        rank = self._ranks(elevated - rem0) + down.sum(0).long()  # back onto the plane sum(x) = 0
        wrap = (rank < 0).long() - (rank > d).long()
        rank += wrap * (d + 1)
        rem0 += wrap * (d + 1)
        order = torch.empty_like(rank).scatter_(0, rank, torch.arange(d + 1, device=rank.device)[:, None].expand(-1, n))
        bary = self._barycentric((elevated - rem0) * np.float32(1.0 / (d + 1)), order)
        return self._vertex_codes(rem0, order, groups), bary

    def _elevate(self, f: torch.Tensor) -> torch.Tensor:
        """(d, N) -> (d+1, N) lattice coordinates, summed in pydensecrf's order."""
        d = self.d
        inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
        scale = [np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
        elevated = f.new_empty(d + 1, f.shape[1])
        total = f.new_zeros(f.shape[1])
        for j in range(d, 0, -1):
            cf = f[j - 1] * scale[j - 1]
            elevated[j] = total - j * cf
            total = total + cf
        elevated[0] = total
        return elevated

    @staticmethod
    def _ranks(rest: torch.Tensor) -> torch.Tensor:
        """pydensecrf's ranks: for each pair i < j, ``rest_i < rest_j`` counts for i, otherwise for j."""
        rank = torch.zeros(rest.shape, dtype=torch.long, device=rest.device)
        for i in range(rest.shape[0] - 1):
            for j in range(i + 1, rest.shape[0]):
                less = rest[i] < rest[j]
                rank[i] += less
                rank[j] += ~less
        return rank

    @staticmethod
    def _barycentric(v: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """pydensecrf's ``b[d - rank_i] += v_i``, ``b[d - rank_i + 1] -= v_i``, ``b[0] += 1 + b[d + 1]``."""
        u = v.gather(0, order).flip(0)  # u[k]: v of the coordinate ranked d - k
        return torch.cat([u[:1] + (1 - u[-1:]), u[1:] - u[:-1]])

    def _vertex_codes(self, rem0: torch.Tensor, order: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """(d+1, N) int64 codes of the simplex vertices: the group, then the d key coordinates in mixed radix.

        Vertex r's key is ``rem0 + r - (d+1) [rank > d - r]`` (the canonical simplex), so the codes are a running
        sum over the ranks. Each digit keeps a margin of 2(d+1) on both sides (a vertex is at most d+1 from
        ``rem0``, a neighbour d more), so a blur neighbour is the code plus a constant, with no carry.
        """
        d = self.d
        key = rem0[:d].long()
        lo = key.amin(1, keepdim=True) - 2 * (d + 1)
        radices = (key.amax(1) - lo[:, 0] + 2 * (d + 1) + 1).tolist()
        strides = np.cumprod([1, *radices]).tolist()  # Python ints: no overflow while checking
        if strides[-1] * (int(groups.max()) + 1) >= 2**63:
            raise ValueError(f"dense CRF: the lattice keys need more than 63 bits ({strides[-1]} per image)")
        self._strides = strides[:d]
        digit = key.new_tensor(strides[:d])
        base = groups * strides[-1] + ((key - lo) * digit[:, None]).sum(0)
        step = sum(strides[:d]) - (d + 1) * torch.cat([digit, digit.new_zeros(1)]).take(order[1:].flip(0))
        return base + torch.cat([step.new_zeros(1, step.shape[1]), step.cumsum(0)])

    def _matrices(self, codes: torch.Tensor, bary: torch.Tensor) -> None:
        """Number the vertices by one stable sort of the pixel-major codes; build splat, slice and the blur.

        Pixel-major entries sort ties by pixel, so each splat row lists its pixels in increasing order, as CSR
        requires; the slice rows get their vertices in increasing order from a small sorting network.
        """
        width, n = codes.shape
        device = codes.device
        codes, perm = torch.sort(codes.T.reshape(-1), stable=True)
        keys, counts = torch.unique_consecutive(codes, return_counts=True)
        del codes
        self.size = keys.numel()
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()  # int32 indices: MKL's, no copy per product
        self.splat = _csr(crow, (perm // width).int(), bary.T.reshape(-1).index_select(0, perm), (self.size, n))
        ids = torch.repeat_interleave(counts.int())
        vertex = torch.empty_like(ids).scatter_(0, perm, ids).view(n, width).T
        del perm, ids
        packed = _sort_rows(vertex * width + torch.arange(width, device=device, dtype=torch.int32)[:, None])
        alpha = np.float32(1.0 / (1.0 + 2.0**-self.d))  # pydensecrf's slice constant
        weights = (bary * alpha).gather(0, packed % width)
        crow = torch.arange(0, n * width + 1, width, device=device, dtype=torch.int32)
        self.slice = _csr(crow, (packed // width).T.reshape(-1), weights.T.reshape(-1), (n, self.size))
        self.neighbours = self._neighbours(keys)

    def _neighbours(self, keys: torch.Tensor) -> torch.Tensor:
        """(d+1, 2, M+1) rows of the two blur neighbours along each axis; ``M`` (the zero row) where absent."""
        d, strides, m = self.d, self._strides, keys.numel()
        out = []
        for j in range(d + 1):
            step = sum(strides) - (d + 1) * (strides[j] if j < d else 0)  # all coordinates +1, axis j -d
            pair = []
            for code in (keys - step, keys + step):  # n1, n2 of pydensecrf
                idx = torch.searchsorted(keys, code).clamp_(max=m - 1)
                pair.append(torch.cat([torch.where(keys.index_select(0, idx) == code, idx, m), idx.new_full((1,), m)]))
            out.append(torch.stack(pair))
        return torch.stack(out)

    def normalize_(self, compat: float) -> Lattice:
        """Become ``compat D^-1/2 K D^-1/2``: the norms fold into the splat columns and the slice rows."""
        n = self.slice.shape[0]
        norm = symmetric_norm(self, n, self.slice.device)
        splat, cut = self.splat, self.slice
        scaled = splat.values() * norm.index_select(0, splat.col_indices())
        self.splat = _csr(splat.crow_indices(), splat.col_indices(), scaled, splat.shape)
        weights = (cut.values().view(n, -1) * (compat * norm)[:, None]).reshape(-1)
        self.slice = _csr(cut.crow_indices(), cut.col_indices(), weights, cut.shape)
        return self

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """Splat (N, C) values, blur along the d+1 axes in order, slice back: pydensecrf's ``compute``."""
        grid = torch.cat([self.splat @ values, values.new_zeros(1, values.shape[1])])  # last row: absent neighbour
        for n1, n2 in self.neighbours:  # the zero row is its own neighbour and stays zero
            grid = grid.add(grid.index_select(0, n1).add_(grid.index_select(0, n2)), alpha=0.5)
        return self.slice @ grid[:-1]


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix whose invariants the lattice guarantees (``tests/test_crf_torch.py`` checks them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Sort (k, N) along its few rows with an odd-even transposition network (faster than ``sort(dim=0)``)."""
    rows = list(x.unbind(0))
    for rnd in range(len(rows)):
        for i in range(rnd % 2, len(rows) - 1, 2):
            rows[i], rows[i + 1] = torch.minimum(rows[i], rows[i + 1]), torch.maximum(rows[i], rows[i + 1])
    return torch.stack(rows)


class ExactFilter:
    """The plain reference: ``K v`` with the exact ``K_ij = exp(-|f_i - f_j|^2 / 2)`` on (d, N) features, per group."""

    def __init__(self, features: torch.Tensor, groups: torch.Tensor) -> None:
        if features.shape[1] > EXACT_MAX_PIXELS:
            raise ValueError(f"the exact dense CRF holds N^2 weights: {features.shape[1]} pixels is over "
                             f"{EXACT_MAX_PIXELS}; use the lattice for real images")  # fmt: skip
        f = features.T.double()
        kernel = torch.exp(-0.5 * torch.cdist(f, f).square()) * (groups[:, None] == groups[None, :])
        self.kernel = kernel.float()

    def normalize_(self, compat: float) -> ExactFilter:
        """Become ``compat D^-1/2 K D^-1/2``."""
        norm = symmetric_norm(self, self.kernel.shape[0], self.kernel.device)
        self.kernel = compat * norm[:, None] * self.kernel * norm[None, :]
        return self

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return self.kernel @ values


def symmetric_norm(filt: Filter, n: int, device: torch.device) -> torch.Tensor:
    """``diag(D^-1/2)`` (N,) with ``D = K 1``: pydensecrf's NORMALIZE_SYMMETRIC filters ``D^-1/2 K D^-1/2``."""
    return 1.0 / torch.sqrt(filt(torch.ones(n, 1, device=device))[:, 0] + 1e-20)


def mean_field(unary: torch.Tensor, kernels: list[Filter], iterations: int) -> torch.Tensor:
    """(5.1)-(5.2) on an (N, L) unary (+inf where a label is absent): ``Q <- softmax(-U + sum_m w_m K_m Q)``.

    Each kernel is already ``w_m K_m`` (normalised, times its compat): pydensecrf's Potts message ``tmp1 -= -w K Q``.
    """
    logits = -unary
    q = _softmax(logits)
    for _ in range(iterations):
        message = logits.clone()
        for kernel in kernels:
            message += kernel(q)
        q = _softmax(message)
    return q


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the few labels of (N, L): on the transposed view, about 10x faster than along dim 1 on a CPU."""
    return torch.softmax(x.T, 0).T.contiguous()


def _on_device(arrays: Images | Sequence, device: torch.device) -> list[torch.Tensor]:
    return [torch.as_tensor(a).to(device) for a in arrays]


def _check_images(images: list[torch.Tensor], maps: list[torch.Tensor], what: str) -> None:
    if len(images) != len(maps):
        raise ValueError(f"dense CRF: {len(images)} images but {len(maps)} {what}")
    for i, (image, m) in enumerate(zip(images, maps, strict=True)):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"dense CRF: image {i} must be uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
        if tuple(m.shape[-2:]) != tuple(image.shape[:2]):
            raise ValueError(f"dense CRF: {what} {i} is {tuple(m.shape[-2:])}, its image {tuple(image.shape[:2])}")


def _features(images: list[torch.Tensor], params: CRFParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat pixels of the batch: Gaussian (x, y)/sxy (2, N), bilateral ((x, y)/sxy, rgb/srgb) (5, N), image index.

    Divided by one-element tensors, not Python scalars: torch turns division by a scalar into a multiplication by
    its reciprocal, and pydensecrf divides.
    """
    device = images[0].device
    gauss, bilateral, groups = [], [], []
    for b, image in enumerate(images):
        h, w = image.shape[:2]
        yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        xy = torch.stack([xx.reshape(-1), yy.reshape(-1)]).float()
        rgb = image.reshape(-1, 3).T.float()
        gauss.append(xy / _scalar(params.gauss_sxy, device))
        bilateral.append(torch.cat([xy / _scalar(params.bi_sxy, device), rgb / _scalar(params.bi_srgb, device)]))
        groups.append(torch.full((h * w,), b, device=device))
    return torch.cat(gauss, 1), torch.cat(bilateral, 1), torch.cat(groups)


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


def _infer(images: list[torch.Tensor], unary: torch.Tensor, params: CRFParams, exact: bool) -> torch.Tensor:
    """Mean-field marginals (N, L) of the whole batch; ``exact`` uses :class:`ExactFilter` (tiny images only)."""
    gauss, bilateral, groups = _features(images, params)
    build = ExactFilter if exact else Lattice
    kernels = [
        build(gauss, groups).normalize_(params.gauss_compat),
        build(bilateral, groups).normalize_(params.bi_compat),
    ]  # pydensecrf's order: Gaussian first
    return mean_field(unary, kernels, params.iterations)


def _split(flat: torch.Tensor, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """(N, ...) batch rows -> per image (..., H, W)."""
    parts = flat.split([im.shape[0] * im.shape[1] for im in images])
    return [p.movedim(0, -1).reshape(*p.shape[1:], *im.shape[:2]) for p, im in zip(parts, images, strict=True)]


def _device(images: Images, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = images[0] if len(images) else None
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def dense_crf_batch(
    images: Images, unaries: Sequence, params: CRFParams, device: str | torch.device | None = None, exact: bool = False
) -> list[torch.Tensor]:
    """Marginals (L_i, H_i, W_i) per image from unaries (L_i, H_i, W_i); the label counts may differ."""
    device = _device(images, device)
    images, unaries = _on_device(images, device), _on_device(unaries, device)
    _check_images(images, unaries, "unaries")
    width = max(u.shape[0] for u in unaries)
    flat = torch.cat([_pad_labels(u.reshape(u.shape[0], -1).T.float(), width) for u in unaries])
    q = _split(_infer(images, flat, params, exact), images)
    return [qi[: u.shape[0]] for qi, u in zip(q, unaries, strict=True)]


def _pad_labels(unary: torch.Tensor, width: int) -> torch.Tensor:
    """(N, L) -> (N, width): absent labels get an infinite unary, so zero marginal."""
    return torch.nn.functional.pad(unary, (0, width - unary.shape[1]), value=math.inf)


def crf_from_probs_batch(
    images: Images, probs: Sequence, params: CRFParams = CRF_PRESETS["seg"], device: str | torch.device | None = None
) -> list[torch.Tensor]:
    """Argmax (H, W) int64 of a CRF with unary ``-log(clip(P, 1e-5))`` (5.3) per image; ``probs`` (L_i, H_i, W_i)."""
    device = _device(images, device)
    unaries = [-torch.log(torch.as_tensor(p, device=device).float().clamp(SOFTMAX_CLIP, 1.0)) for p in probs]
    return [q.argmax(0) for q in dense_crf_batch(images, unaries, params, device)]


def label_unary(index: torch.Tensor, n_labels: torch.Tensor, width: int, gt_prob: float) -> torch.Tensor:
    """(5.4) with ``zero_unsure``: ``index`` (N,) in 1..n (0 = unsure) over ``n_labels`` (N,) labels -> (N, width)."""
    n = n_labels.double()[:, None]
    other = -torch.log((1.0 - gt_prob) / (n - 1).clamp(min=1))  # float64 then float32, as numpy
    unary = other.expand(-1, width).clone()
    unary.scatter_(1, (index - 1).clamp(min=0)[:, None], -math.log(gt_prob))
    unary = torch.where(index[:, None] == 0, -torch.log(1.0 / n), unary)
    unary = unary.float()
    return unary.masked_fill(torch.arange(width, device=index.device) >= n_labels[:, None], math.inf)


def crf_from_labels_batch(
    images: Images, labels: Sequence, keys: Sequence, params: CRFParams, device: str | torch.device | None = None
) -> list[torch.Tensor]:
    """Label CRF (5.4) per image: ``labels`` (H_i, W_i) hold ids from ``keys[i]``; returns refined ids (uint8).

    As ``crf.crf_from_labels``: the CRF sees only the image's own keys, and an id outside them (255) is unsure.
    An image with one key comes back as that key.
    """
    device = _device(images, device)
    images, labels = _on_device(images, device), _on_device(labels, device)
    _check_images(images, labels, "label maps")
    keys = [np.asarray(k, dtype=np.int64) for k in keys]
    width = max(len(k) for k in keys)
    lut = np.zeros((len(keys), 256), np.int64)  # id -> 1 + index into the image's keys, 0 = unsure
    table = np.zeros((len(keys), width), np.int64)  # index -> id
    for b, k in enumerate(keys):
        lut[b, k] = np.arange(1, len(k) + 1)
        table[b, : len(k)] = k
    lut, table = torch.as_tensor(lut, device=device), torch.as_tensor(table, device=device)
    n_labels = torch.tensor([len(k) for k in keys], device=device)
    groups = torch.cat([torch.full((lab.numel(),), b, device=device) for b, lab in enumerate(labels)])
    index = lut[groups, torch.cat([lab.reshape(-1) for lab in labels]).long()]
    unary = label_unary(index, n_labels[groups], width, params.gt_prob)
    best = table[groups, _infer(images, unary, params, exact=False).argmax(1)].to(torch.uint8)
    return _split(best, images)


def refine_seed_crf_batch(
    images: Images, seeds: Sequence, tags: np.ndarray | torch.Tensor, preset: str = "seed",
    device: str | torch.device | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Batched ``crf.refine_seed_crf``: labels restricted to background + each image's tags (B, K)."""
    tags = tags.cpu().numpy() if isinstance(tags, torch.Tensor) else np.asarray(tags)
    keys = [np.concatenate([[0], np.flatnonzero(t) + 1]) for t in tags]
    return crf_from_labels_batch(images, seeds, keys, CRF_PRESETS[preset], device)

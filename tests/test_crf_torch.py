"""The torch dense CRF (§5) against pydensecrf and against its exact O(N^2) reference, on tiny fixed scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss.cam import crf
from wsss.cam.crf_torch import (
    ExactFilter,
    Lattice,
    crf_from_labels_batch,
    crf_from_probs_batch,
    dense_crf_batch,
    refine_seed_crf_batch,
)

PYDENSECRF_AGREEMENT = 0.999  # argmax agreement with pydensecrf: the same lattice, only float summation order differs
PYDENSECRF_MARGINALS = 1e-5  # max |Q - Q_pydensecrf|
EXACT_AGREEMENT = 0.99  # argmax agreement with the exact Gaussian kernels: the lattice's approximation error
EXACT_MARGINALS = 0.03  # max |Q - Q_exact|, same cause (measured up to 0.006 on these scenes)
EXACT_FILTER = 0.08  # mean relative error of one normalised lattice filter (measured 0.047)
SIZES = [(21, 26), (30, 23), (26, 26)]


def scene(h: int, w: int, n_fg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image of ``n_fg`` coloured rectangles over a grey background, and its label map (0..n_fg)."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 90.0)
    label = np.zeros((h, w), np.uint8)
    for k in range(1, n_fg + 1):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        image[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3)
        label[y : y + h // 2, x : x + w // 2] = k
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8), label


def noisy_probs(label: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, H, W) CAM-like probabilities: half the one-hot truth, half random."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(n, dtype=np.float32)[label].transpose(2, 0, 1)
    return (0.5 * onehot + 0.5 * rng.dirichlet(np.ones(n), label.shape).transpose(2, 0, 1)).astype(np.float32)


def degraded_seed(label: np.ndarray, seed: int) -> np.ndarray:
    """The truth with 20% of pixels flipped to another label and 20% unsure (255)."""
    rng = np.random.default_rng(seed)
    out = label.copy()
    flip = rng.random(label.shape) < 0.2
    out[flip] = rng.integers(0, label.max() + 1, flip.sum())
    out[rng.random(label.shape) < 0.2] = 255
    return out


def softmax_unary(probs: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs, 1e-5, 1.0)).astype(np.float32)


def agreement(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == b).mean())


@pytest.mark.parametrize("preset", sorted(crf.CRF_PRESETS))
@pytest.mark.parametrize("n_fg", [1, 3])
def test_marginals_match_pydensecrf(preset: str, n_fg: int) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    params = crf.CRF_PRESETS[preset]
    image, label = scene(*SIZES[0], n_fg, seed=n_fg)
    unary = softmax_unary(noisy_probs(label, n_fg + 1, seed=1))
    ref = crf.dense_crf(image, unary.reshape(n_fg + 1, -1), params)
    ours = dense_crf_batch([image], [unary], params)[0].numpy()
    assert np.abs(ours - ref).max() <= PYDENSECRF_MARGINALS
    assert agreement(ours.argmax(0), ref.argmax(0)) >= PYDENSECRF_AGREEMENT


def test_seed_refinement_batch_matches_pydensecrf() -> None:
    """Images of three sizes in one batch: one, two and no tagged classes, with unsure (255) seed pixels."""
    pytest.importorskip("pydensecrf.densecrf")
    images, seeds = [], []
    for i, (size, n_fg) in enumerate(zip(SIZES, [1, 2, 2], strict=True)):
        image, label = scene(*size, n_fg, seed=10 + i)
        images.append(image)
        seeds.append(degraded_seed(np.where(label > 0, label + 4 * i, 0).astype(np.uint8), seed=i))
    tags = np.zeros((3, 20), bool)
    tags[0, 0] = True  # class 1
    tags[1, [4, 5]] = True  # classes 5, 6
    # image 2 has no tags: its seed classes 9, 10 are unknown to it, so it comes back all background
    ours = refine_seed_crf_batch(images, seeds, tags)
    for image, seed, tag, out in zip(images, seeds, tags, ours, strict=True):
        ref = crf.refine_seed_crf(image, seed, tag)
        assert out.dtype == torch.uint8 and out.shape == seed.shape
        assert agreement(out, ref) >= PYDENSECRF_AGREEMENT
    assert not ours[2].any()
    assert set(np.unique(ours[1].numpy())) <= {0, 5, 6}


def test_probs_batch_with_different_label_counts_matches_pydensecrf() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    params = crf.CRF_PRESETS["seg"]
    batch = [scene(*size, n_fg, seed=20 + n_fg) for size, n_fg in zip(SIZES, [1, 3, 2], strict=True)]
    probs = [noisy_probs(label, label.max() + 1, seed=2) for _, label in batch]
    ours = crf_from_probs_batch([image for image, _ in batch], probs, params)
    for (image, _), p, out in zip(batch, probs, ours, strict=True):
        assert agreement(out, crf.crf_from_probs(image, p, params)) >= PYDENSECRF_AGREEMENT


@pytest.mark.parametrize("preset", sorted(crf.CRF_PRESETS))
def test_lattice_approximates_the_exact_model(preset: str) -> None:
    """The fast path against the plain O(N^2) reference (exact Gaussian kernels, no pydensecrf needed)."""
    params = crf.CRF_PRESETS[preset]
    image, label = scene(*SIZES[1], 2, seed=3)
    unary = torch.as_tensor(softmax_unary(noisy_probs(label, 3, seed=4)))
    fast = dense_crf_batch([image], [unary], params)[0]
    exact = dense_crf_batch([image], [unary], params, exact=True)[0]
    assert (fast - exact).abs().max() <= EXACT_MARGINALS
    assert agreement(fast.argmax(0), exact.argmax(0).numpy()) >= EXACT_AGREEMENT


def test_lattice_filter_is_close_to_the_exact_gaussian() -> None:
    """Normalised filter responses of random features: the lattice within 8% of the exact kernel on average."""
    torch.manual_seed(0)
    features = torch.rand(5, 300) * torch.tensor([[3.0], [3.0], [4.0], [4.0], [4.0]])
    groups = torch.zeros(300, dtype=torch.long)
    values = torch.rand(300, 2)
    fast = Lattice(features, groups).normalize_(1.0)(values)
    exact = ExactFilter(features, groups).normalize_(1.0)(values)
    assert ((fast - exact).abs().mean() / exact.abs().mean()).item() < EXACT_FILTER
    assert not torch.allclose(fast, exact, atol=1e-3)  # it is an approximation: a copy of the oracle would pass this


def test_lattice_matrices_are_valid_csr() -> None:
    """Sorted, distinct column indices per row: the invariants the CSR products assume (checked, not trusted)."""
    torch.manual_seed(1)
    lattice = Lattice(torch.rand(5, 1000) * 20, torch.arange(2).repeat_interleave(500))  # two images
    with torch.sparse.check_sparse_tensor_invariants():
        for m in (lattice.splat, lattice.slice):
            torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape)
    assert lattice.neighbours.shape == (6, 2, lattice.size + 1)


def test_images_of_a_batch_do_not_interact() -> None:
    params = crf.CRF_PRESETS["seed"]
    pairs = [scene(*size, 2, seed=30 + i) for i, size in enumerate(SIZES)]
    unaries = [torch.as_tensor(softmax_unary(noisy_probs(label, 3, seed=5))) for _, label in pairs]
    images = [image for image, _ in pairs]
    together = dense_crf_batch(images, unaries, params)
    for image, unary, q in zip(images, unaries, together, strict=True):
        torch.testing.assert_close(q, dense_crf_batch([image], [unary], params)[0], atol=1e-6, rtol=0)


def test_label_crf_with_one_key_returns_it() -> None:
    image, label = scene(*SIZES[0], 1, seed=6)
    out = crf_from_labels_batch([image], [label], [np.array([7])], crf.CRF_PRESETS["seed"])[0]
    assert torch.equal(out, torch.full(label.shape, 7, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    params = crf.CRF_PRESETS["seed"]
    pairs = [scene(*size, 2, seed=40 + i) for i, size in enumerate(SIZES)]
    images = [image for image, _ in pairs]
    seeds = [degraded_seed(label, seed=7) for _, label in pairs]
    keys = [np.array([0, 1, 2])] * len(pairs)
    cpu = crf_from_labels_batch(images, seeds, keys, params)
    gpu = crf_from_labels_batch(images, seeds, keys, params, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        assert b.is_cuda and agreement(a, b.cpu().numpy()) >= PYDENSECRF_AGREEMENT


def test_bad_inputs_get_one_line_errors() -> None:
    image, label = scene(*SIZES[0], 1, seed=8)
    unary = torch.zeros(2, *label.shape)
    with pytest.raises(ValueError, match="image 0 must be uint8"):
        dense_crf_batch([image.astype(np.float32)], [unary], crf.CRF_PRESETS["seed"])
    with pytest.raises(ValueError, match="unaries 0 is"):
        dense_crf_batch([image], [unary[:, 1:]], crf.CRF_PRESETS["seed"])
    with pytest.raises(ValueError, match="1 images but 2 label maps"):
        crf_from_labels_batch([image], [label, label], [np.array([0, 1])] * 2, crf.CRF_PRESETS["seed"])
    with pytest.raises(ValueError, match="exact dense CRF"):
        ExactFilter(torch.zeros(2, 5000), torch.zeros(5000, dtype=torch.long))

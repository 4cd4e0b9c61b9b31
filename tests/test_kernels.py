"""wsss.kernels: each Triton kernel against its PyTorch reference, each reference against the METHODS formulas.

The Triton paths run on CUDA (compiled, when ``TRITON_INTERPRET`` is not set) or, on CPU, under the Triton
interpreter (``TRITON_INTERPRET=1``, which ``make test`` sets before Python starts); without either they are
skipped. Shapes stay small: the interpreter is slow. The CUDA-only tests (device-side range asserts, no host syncs)
run on the GPU check.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.cam.labels import cam_to_label
from wsss.cam.pipeline import forward_pyramid, stack_maps, tensor_pyramid
from wsss.kernels import (
    NORM_EPS,
    backend_for,
    cam_post,
    cam_postprocess,
    cam_postprocess_reference,
    combine_sources,
    infonce,
    masked_ptc,
    masked_ptc_reference,
    normalize_maps,
    pair_counts,
    patch_infonce,
    patch_infonce_reference,
)
from wsss.kernels.dispatch import interpreter_enabled, triton_available
from wsss.kernels.infonce import gradient_lists
from wsss.kernels.utils import check_grid, check_range
from wsss.models import CAMSettings
from wsss.train.seco_losses import label_to_aff_mask

# Tolerances, relative to the largest magnitude of the expected tensor (max |a - b| <= REL * max(1, max |b|)).
FP32_VALUE_REL = 1e-5  # fp32 (or fp16/bf16 inputs with fp32 accumulation): values
FP32_GRAD_REL = 1e-5  # fp32 gradients (atomic/blocked summation orders differ from the reference)
HALF_GRAD_REL = 1e-2  # fp16/bf16 gradients: both sides accumulate in fp32, then round to the input dtype
ORACLE_REL = 1e-10  # float64 reference against the per-anchor / per-pair Python transcriptions
CAM_ABS = 1e-6  # normalised CAMs in [0, 1): the Triton path repeats the reference's fp32 operations in order

# the interpreter runs kernels on CPU tensors; without it, a GPU runs them compiled
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu")
TRITON_RUNS = triton_available() and (DEVICE.type == "cuda" or interpreter_enabled())
requires_triton = pytest.mark.skipif(
    not TRITON_RUNS,
    reason="Triton kernels need `import triton` and a CUDA device, or TRITON_INTERPRET=1 set before Python starts "
    "(make test sets it)",
)
requires_cuda_triton = pytest.mark.skipif(
    not (triton_available() and DEVICE.type == "cuda"), reason="compiled Triton on a CUDA device (the GPU check)"
)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all()
    err = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


def grad_rel(dtype: torch.dtype) -> float:
    return HALF_GRAD_REL if dtype in HALF_DTYPES else FP32_GRAD_REL


# ---------------------------------------------------------------------------------------------- patch_infonce


def infonce_inputs(b, n, d, kp, kn, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, n, d, generator=g, dtype=torch.float64), dim=-1)
    pos = torch.randint(0, n, (b, n, kp), generator=g)  # duplicates included: key gradients collide
    neg = torch.randint(0, n, (b, n, kn), generator=g)
    weight = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.5  # a non-uniform upstream gradient
    return v.to(DEVICE, dtype), pos.to(DEVICE), neg.to(DEVICE), weight.to(DEVICE)


def infonce_loop(v, pos, neg, tau, neg_mode):
    """(4.8)-(4.13) one anchor and one positive at a time: -log(X_ij / (X_ij + Y_i))."""
    out = torch.zeros(v.shape[:2], dtype=v.dtype)
    for b in range(v.shape[0]):
        for i in range(v.shape[1]):
            if neg_mode == "paper":
                y = sum(torch.exp(v[b, i] @ v[b, k] / tau) for k in neg[b, i].tolist())
            else:  # cll_v1: exp before /tau (D2)
                y = sum(torch.exp(v[b, i] @ v[b, k]) / tau for k in neg[b, i].tolist())
            for j in pos[b, i].tolist():
                x = torch.exp(v[b, i] @ v[b, j] / tau)
                out[b, i] = out[b, i] - torch.log(x / (x + y))
    return out


@pytest.mark.parametrize("neg_mode", ["paper", "code"])
def test_patch_infonce_reference_matches_per_anchor_loop(neg_mode):
    v, pos, neg, weight = (t.cpu() for t in infonce_inputs(2, 5, 3, 2, 3, torch.float64))
    v.requires_grad_(True)
    got = patch_infonce_reference(v, pos, neg, 0.1, neg_mode)
    (grad,) = torch.autograd.grad((got * weight).sum(), v)
    want = infonce_loop(v, pos, neg, 0.1, neg_mode)
    (want_grad,) = torch.autograd.grad((want * weight).sum(), v)
    assert_close_rel(got, want, ORACLE_REL)
    assert_close_rel(grad, want_grad, ORACLE_REL)


def test_patch_infonce_code_and_paper_modes_differ_only_through_tau():
    v, pos, neg, _ = infonce_inputs(1, 6, 4, 2, 3, torch.float64)
    paper, code = (patch_infonce_reference(v, pos, neg, 0.1, m) for m in ("paper", "code"))
    assert (paper - code).abs().max() > 1e-3
    # at tau = 1 exp(x)/tau == exp(x/tau): the modes coincide
    assert_close_rel(patch_infonce_reference(v, pos, neg, 1.0, "code"), patch_infonce_reference(v, pos, neg, 1.0),
                     ORACLE_REL)  # fmt: skip


@requires_triton
@pytest.mark.parametrize(
    ("shape", "dtype", "neg_mode"),
    [
        ((1, 37, 24, 1, 5), torch.float32, "paper"),  # batch 1, Kp = 1, N not a multiple of the anchor block
        ((2, 45, 130, 4, 7), torch.float32, "code"),  # D = 2 chunks + a masked tail, several anchor blocks
        ((2, 45, 130, 4, 7), torch.float32, "paper"),
        ((2, 33, 16, 3, 2), torch.float16, "paper"),
        ((2, 33, 16, 3, 2), torch.bfloat16, "code"),
    ],
)
def test_patch_infonce_triton_matches_reference(shape, dtype, neg_mode):
    v, pos, neg, weight = infonce_inputs(*shape, dtype=dtype)
    v.requires_grad_(True)
    want = patch_infonce(v, pos, neg, 0.1, neg_mode, backend="torch")
    (want_grad,) = torch.autograd.grad((want * weight).sum(), v)
    got = patch_infonce(v, pos, neg, 0.1, neg_mode, backend="triton")
    (grad,) = torch.autograd.grad((got * weight).sum(), v)
    assert got.dtype == torch.float32 and got.shape == shape[:2] and grad.dtype == dtype
    assert_close_rel(got, want, FP32_VALUE_REL)
    assert_close_rel(grad, want_grad, grad_rel(dtype))


def test_patch_infonce_rejects_bad_inputs():
    v, pos, neg, _ = (t.cpu() for t in infonce_inputs(2, 5, 3, 2, 3))  # a GPU reports the range by device assert
    with pytest.raises(ValueError, match="pos_idx"):
        patch_infonce(v, pos[:1], neg, 0.1)
    with pytest.raises(IndexError, match="neg_idx"):
        patch_infonce(v, pos, neg + 5, 0.1)
    with pytest.raises(IndexError, match="pos_idx"):
        patch_infonce(v, pos - 3, neg, 0.1, backend="torch")
    with pytest.raises(TypeError, match="integer"):
        patch_infonce(v, pos.float(), neg, 0.1)
    with pytest.raises(ValueError, match="neg_mode"):
        patch_infonce(v, pos, neg, 0.1, "exp")
    with pytest.raises(ValueError, match="tau"):
        patch_infonce(v, pos, neg, 0.0)


def sap_shaped_inputs(b, n, d, kp, kn, dtype=torch.float32, seed=1):
    """SAP's index pattern: the anchors of one pseudo class share one ranked list of key rows, so a few rows are
    keys of every anchor of their class (two classes here, assigned at random)."""
    v, _, _, weight = infonce_inputs(b, n, d, kp, kn, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 2, (b, n), generator=g)
    ranked = torch.stack([torch.randperm(n, generator=g) for _ in range(2 * b)]).view(b, 2, n)
    lists = ranked.gather(1, cls[..., None].expand(-1, -1, n))  # (B, N, N): each anchor's class ranking
    return v, lists[..., :kp].contiguous().to(DEVICE), lists[..., -kn:].contiguous().to(DEVICE), weight


def test_gradient_lists_group_every_term_by_row_in_a_fixed_order():
    g = torch.Generator().manual_seed(3)
    b, n, k, d = 2, 9, 4, 5
    idx = torch.randint(0, n, (b, n, k), generator=g)
    idx[:, :, 0] = 2  # a key row of every anchor
    coef = torch.randn(b, n, k, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    offsets, sources, weights = gradient_lists(idx, coef)
    assert offsets.dtype == sources.dtype == torch.int32 and (offsets[:, -1] == 2 * n * k).all()
    # dL/dv: every slot (i, j) adds c_ij v_j to row i and c_ij v_i to row j
    want = torch.einsum("bik,bikd->bid", coef, v[torch.arange(b)[:, None, None], idx])
    for bi in range(b):
        want[bi].index_add_(0, idx[bi].flatten(), coef[bi].flatten()[:, None] * v[bi].repeat_interleave(k, 0))
    got = torch.zeros_like(v)
    for bi in range(b):
        for r in range(n):
            lo, hi = offsets[bi, r].item(), offsets[bi, r + 1].item()
            got[bi, r] = (weights[bi, lo:hi, None] * v[bi, sources[bi, lo:hi].long()]).sum(0)
            assert torch.equal(sources[bi, lo : lo + k].long(), idx[bi, r])  # the row's own slots first, in order
            assert torch.equal(weights[bi, lo : lo + k], coef[bi, r])
            users = sources[bi, lo + k : hi]  # then its uses as a key, in anchor order
            assert len(users) == (idx[bi] == r).sum() and (users[1:] >= users[:-1]).all()
    assert (offsets[:, 3] - offsets[:, 2] >= k + n).all()  # the shared row lists every anchor
    assert_close_rel(got, want, ORACLE_REL)


@requires_triton
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1, 53, 70, 5, 3), torch.float32),  # N past one anchor block, D = 64 + a masked tail of 6
        ((1, 24, 16, 4, 4), torch.bfloat16),  # D below one chunk
    ],
)
def test_patch_infonce_shared_keys_gradient_is_deterministic_and_matches_reference(shape, dtype):
    v, pos, neg, weight = sap_shaped_inputs(*shape, dtype=dtype)
    v.requires_grad_(True)
    want = torch.autograd.grad((patch_infonce(v, pos, neg, 0.1, "code", backend="torch") * weight).sum(), v)[0]
    grads = [torch.autograd.grad((patch_infonce(v, pos, neg, 0.1, "code", backend="triton") * weight).sum(), v)[0]
             for _ in range(2)]  # fmt: skip
    assert torch.equal(grads[0], grads[1])  # the same bits on every run
    assert_close_rel(grads[0], want, grad_rel(dtype))
    assert "tl.atomic" not in inspect.getsource(infonce)  # key rows are reduced from sorted lists, not atomics


def force_config(monkeypatch, kernel, config):
    """Make an autotuned kernel run ``config`` (a single config is launched without timing)."""
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})


@requires_triton
def test_patch_infonce_bits_do_not_depend_on_the_autotuned_config(monkeypatch):
    v, pos, neg, _ = sap_shaped_inputs(1, 37, 70, 3, 2)  # anchor blocks of 16, 32, 64; two feature chunks
    losses = []
    for config in infonce.FORWARD_CONFIGS:
        force_config(monkeypatch, infonce._forward_kernel, config)
        losses.append(patch_infonce(v, pos, neg, 0.1, backend="triton"))
    assert all(torch.equal(loss, losses[0]) for loss in losses[1:])
    v, pos, neg, weight = sap_shaped_inputs(1, 12, 70, 3, 2)
    v.requires_grad_(True)
    grads = []
    for config in infonce.GATHER_CONFIGS:  # term blocks of 8 to 32, feature chunks of 64 to 256
        force_config(monkeypatch, infonce._gather_sum_kernel, config)
        grads.append(torch.autograd.grad((patch_infonce(v, pos, neg, 0.1, backend="triton") * weight).sum(), v)[0])
    assert all(torch.equal(grad, grads[0]) for grad in grads[1:])


DEVICE_ASSERT_SCRIPT = """
import torch
from wsss.kernels import masked_ptc, patch_infonce

v = torch.randn(1, 8, 4, device="cuda")
idx = torch.zeros(1, 8, 2, dtype=torch.int64, device="cuda")
if CASE == "infonce":
    patch_infonce(v, idx, idx + 8, 0.1)
else:
    masked_ptc(v.transpose(1, 2), torch.full((1, 8), 256, device="cuda"))
torch.cuda.synchronize()
print("not reached", flush=True)
"""


@requires_cuda_triton
@pytest.mark.parametrize("case", ["infonce", "ptc"])
def test_range_checks_on_cuda_are_device_asserts(case):
    """Out-of-range indices or labels on a GPU: a device-side assert, a RuntimeError at the next CUDA call after it
    fires, at the latest the next synchronisation (in a subprocess: it leaves the CUDA context unusable). That the
    check itself queues without a host sync is ``test_kernels_run_without_host_syncs_on_cuda``."""
    script = f"CASE = {case!r}\n" + textwrap.dedent(DEVICE_ASSERT_SCRIPT)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "not reached" not in run.stdout, run.stdout + run.stderr
    assert run.returncode != 0 and "device-side assert" in run.stderr, run.stderr


@requires_cuda_triton
def test_kernels_run_without_host_syncs_on_cuda():
    v, pos, neg, weight = sap_shaped_inputs(2, 53, 70, 5, 3)
    feats, labels = ptc_inputs(2, 24, 6, 6)
    cams, tags, cams2 = cam_inputs((2, 2, 2, 3, 9, 13), torch.float32, fuse=True)
    v.requires_grad_(True)
    feats.requires_grad_(True)

    def step():
        infonce_loss = (patch_infonce(v, pos, neg, 0.1, backend="triton") * weight).sum()
        torch.autograd.grad(infonce_loss + masked_ptc(feats, labels, backend="triton"), (v, feats))
        cam_postprocess(cams, tags, torch.full((2,), 0.3, device=DEVICE), "sum", "max", cams2, backend="triton")

    step()  # compiles and autotunes, which synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_check_range_on_the_cpu_raises_at_once():
    check_range("idx", torch.tensor([0, 3, 4]), 0, 5)
    check_range("idx", torch.zeros(0, dtype=torch.int64), 0, 1)
    with pytest.raises(IndexError, match=r"idx holds values outside \[0, 4\)"):
        check_range("idx", torch.tensor([0, 3, 4]), 0, 4)
    with pytest.raises(ValueError, match="labels"):
        check_range("labels", torch.tensor([-1, 0]), 0, 256, ValueError)


# ------------------------------------------------------------------------------------------------- masked_ptc


def ptc_with_pair_mask(feats, labels):
    """(3.18) through the (B, hw, hw) int64 mask of (1.7): the pre-kernel ``ptc_loss(feats, label_to_aff_mask(l))``."""
    aff = label_to_aff_mask(labels)
    tokens = F.normalize(feats.flatten(2), dim=1, eps=1e-8)
    cos = (tokens.transpose(1, 2) @ tokens).abs()
    pos, neg = (aff == 1).to(cos.dtype), (aff == 0).to(cos.dtype)
    return 0.5 * (1 - (cos * pos).sum() / (pos.sum() + 1)) + 0.5 * (cos * neg).sum() / (neg.sum() + 1)


def ptc_inputs(b, d, h, w, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (b, h, w), generator=g)
    labels[labels == 3] = 255
    if b > 1:  # an image whose tokens all differ: no positive pair at all
        labels[1] = torch.arange(h * w).reshape(h, w) % 250
    if b > 2:  # an image that is entirely ignored
        labels[2] = 255
    return feats.to(DEVICE, dtype), labels.to(DEVICE)


def test_masked_ptc_reference_matches_pair_mask_formula():
    feats, labels = (t.cpu() for t in ptc_inputs(3, 6, 4, 5, torch.float64))
    feats.requires_grad_(True)
    got = masked_ptc_reference(feats, labels)
    (grad,) = torch.autograd.grad(got, feats)
    want = ptc_with_pair_mask(feats, labels)
    (want_grad,) = torch.autograd.grad(want, feats)
    assert_close_rel(got, want, ORACLE_REL)
    assert_close_rel(grad, want_grad, ORACLE_REL)


def test_pair_counts_match_the_pair_mask():
    _, labels = ptc_inputs(3, 2, 5, 6)
    aff = label_to_aff_mask(labels)
    n_pos, n_neg = pair_counts(labels.flatten(1))
    assert (n_pos.item(), n_neg.item()) == ((aff == 1).sum().item(), (aff == 0).sum().item())


@requires_triton
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1, 16, 5, 7), torch.float32),  # one partial token tile
        ((3, 40, 9, 11), torch.float32),  # 99 tokens: several tiles, the diagonal ones partial; D not a multiple
        ((3, 40, 9, 11), torch.float16),
        ((2, 24, 6, 6), torch.bfloat16),
    ],
)
def test_masked_ptc_triton_matches_reference(shape, dtype):
    feats, labels = ptc_inputs(*shape, dtype=dtype)
    feats.requires_grad_(True)
    want = masked_ptc(feats, labels, backend="torch")
    (want_grad,) = torch.autograd.grad(want, feats)
    got = masked_ptc(feats, labels, backend="triton")
    (grad,) = torch.autograd.grad(got, feats)
    assert got.dtype == torch.float32 and got.dim() == 0 and grad.dtype == dtype
    assert_close_rel(got, want, FP32_VALUE_REL)
    assert_close_rel(grad, want_grad, grad_rel(dtype))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_masked_ptc_all_ignored_is_the_zero_count_value(backend):
    feats = torch.randn(2, 8, 3, 4, device=DEVICE, requires_grad=True)
    labels = torch.full((2, 3, 4), 255, device=DEVICE)
    loss = masked_ptc(feats, labels, backend=backend)
    (grad,) = torch.autograd.grad(loss, feats)
    assert loss.item() == 0.5  # 1/2 (1 - 0/1) + 1/2 0/1
    assert torch.count_nonzero(grad) == 0


def test_masked_ptc_accepts_flat_tokens_and_rejects_mismatches():
    feats, labels = ptc_inputs(2, 5, 3, 4)
    flat = masked_ptc(feats.flatten(2), labels.flatten(1), backend="torch")
    assert flat.item() == pytest.approx(masked_ptc(feats, labels, backend="torch").item(), rel=1e-6)
    with pytest.raises(ValueError, match="token grid"):
        masked_ptc(feats, labels[:, :2])
    with pytest.raises(ValueError, match="integer"):
        masked_ptc(feats, labels.float())
    feats, labels = feats.cpu(), labels.cpu()  # a GPU reports the range by device assert
    for bad in (256, -1):
        with pytest.raises(ValueError, match=r"labels .*outside \[0, 256\)"):
            masked_ptc(feats, labels.masked_fill(labels == 0, bad))


# --------------------------------------------------------------------------------------------- cam_postprocess


class _ConvCAM(nn.Module):
    """A stand-in CAM network for the CAM pipeline: a 1x1 convolution, (logits, cams) at any input size."""

    def __init__(self, k: int):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        a = self.conv(x)
        return a.amax((2, 3)), a


def aligned_stack(model, x, scales):
    """(S, 2, B, K, H, W): each scale's CAMs of the image and of its flip, resized to (H, W), flip undone; scale
    1.0 first, inputs ``Bil(x; floor(sH), floor(sW))`` (§1.3; the sizes are no longer rounded to a patch multiple)."""
    b, _, h, w = x.shape
    out = []
    for s in [1.0, *[s for s in scales if s != 1.0]]:
        xs = x if s == 1.0 else F.interpolate(x, (int(s * h), int(s * w)), mode="bilinear", align_corners=False)
        a = F.interpolate(model(torch.cat([xs, xs.flip(-1)]))[1], size=(h, w), mode="bilinear", align_corners=False)
        out.append(torch.stack([a[:b], a[b:].flip(-1)]))
    return torch.stack(out)


def test_cam_postprocess_reference_matches_the_multiscale_formulas():
    torch.manual_seed(0)
    model, x = _ConvCAM(5).eval(), torch.randn(2, 3, 12, 17)
    tags = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.float32)
    scales = (1.0, 0.5, 1.5)
    settings = CAMSettings(input_size=None, scales=scales)
    with torch.no_grad():
        stack = aligned_stack(model, x, scales)
        m = torch.maximum(stack[:, 0], stack[:, 1]).relu().sum(0)  # (1.3), (1.4)
        want_cam = normalize_maps(m, "minmax")  # (1.5)
        _, want_label = cam_to_label(want_cam, tags, 0.4)
        raw = forward_pyramid(model, tensor_pyramid(x, settings), settings)
        piped = stack_maps(raw, (12, 17), settings)  # the pipeline's stack: the kernels' input
        got_cam, label, conf = cam_postprocess_reference(piped, tags, 0.4, "max", "minmax", return_cams=True)
    torch.testing.assert_close(piped, stack)
    assert_close_rel(got_cam, want_cam, CAM_ABS)
    assert torch.equal(label, want_label)
    assert torch.equal(conf, (tags[:, :, None, None] * got_cam).amax(1).clamp_min(0.4))


def test_cam_postprocess_fusion_is_cobra_4_19():
    torch.manual_seed(1)
    cams, cams2 = torch.randn(2, 2, 1, 3, 5, 6, 2).unbind(-1)
    tags = torch.ones(1, 3)
    m1, _, _ = cam_postprocess_reference(cams, tags, 0.5, "sum", "max", return_cams=True)
    m2, _, _ = cam_postprocess_reference(cams2, tags, 0.5, "sum", "max", return_cams=True)
    fused, _, _ = cam_postprocess_reference(cams, tags, 0.5, "sum", "max", cams2, return_cams=True)
    assert torch.equal(fused, torch.maximum((m1 + m2) / 2, m2))
    assert_close_rel(fused, (torch.maximum(m1, m2) + m2) / 2, CAM_ABS)  # the code's form (D14)
    m = cams.relu().sum((0, 1))  # (4.17): flip sum, scale sum, then M / (max M + 1e-5)
    assert_close_rel(m1, m / (m.amax((2, 3), keepdim=True) + 1e-5), CAM_ABS)


def cam_inputs(shape, dtype, seed=0, fuse=False):
    """Random CAMs with ties built in: class 2 repeats class 1 (both tagged) and image 0 has no tag at all."""
    s, f, b, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    cams = torch.randn(shape, generator=g)
    cams[:, :, :, 2] = cams[:, :, :, 1]
    tags = (torch.rand(b, k, generator=g) < 0.5).float()
    tags[:, 1:3] = 1
    tags[0] = 0
    cams2 = None
    if fuse:
        cams2 = torch.randn(shape, generator=g)
        cams2[:, :, :, 2] = cams2[:, :, :, 1]
        cams2 = cams2.to(DEVICE, dtype)
    return cams.to(DEVICE, dtype), tags.to(DEVICE), cams2


@requires_triton
@pytest.mark.parametrize(
    ("shape", "dtype", "flip_merge", "norm", "fuse"),
    [
        ((2, 2, 1, 4, 9, 13), torch.float32, "max", "minmax", False),  # SeCo; fewer pixels than a block
        ((2, 2, 2, 4, 33, 33), torch.float32, "sum", "max", True),  # CoBra with fusion; several pixel blocks
        ((2, 1, 3, 5, 7, 9), torch.float16, "max", "max", False),  # no flip
        ((2, 2, 2, 4, 8, 8), torch.bfloat16, "sum", "minmax", True),
    ],
)
def test_cam_postprocess_triton_matches_reference(shape, dtype, flip_merge, norm, fuse):
    cams, tags, cams2 = cam_inputs(shape, dtype, fuse=fuse)
    b = shape[2]
    for bkg in (0.45, torch.linspace(-0.05, 0.6, b, device=DEVICE)):  # a threshold, then per-image scores
        want = cam_postprocess(cams, tags, bkg, flip_merge, norm, cams2, return_cams=True, backend="torch")
        got = cam_postprocess(cams, tags, bkg, flip_merge, norm, cams2, return_cams=True, backend="triton")
        assert got[1].dtype == torch.int64 and got[2].dtype == torch.float32 and got[0].dtype == torch.float32
        assert_close_rel(got[0], want[0], CAM_ABS)
        assert torch.equal(got[1], want[1])
        assert_close_rel(got[2], want[2], CAM_ABS)
        assert not (got[1] == 3).any()  # class 3 (index 2) only ties class 2, which comes first
    _, label, _ = cam_postprocess(cams, tags, -0.05, flip_merge, norm, cams2, backend="triton")
    assert (label[0] == 1).all()  # no tag: every class ties at 0 > bkg, the first one wins


def merged_reference(cams, flip_merge, norm):
    """(1.3)/(4.17) written out: ReLU, flip merge, scale sum, normalisation (float32)."""
    a = cams.float().relu()
    return normalize_maps((a.amax(1) if flip_merge == "max" else a.sum(1)).sum(0), norm)


@pytest.mark.parametrize("combine", ["fuse", "avg", "max"])
@pytest.mark.parametrize(("flip_merge", "norm"), [("sum", "max"), ("max", "minmax")])
def test_cam_postprocess_combine_is_combine_sources_of_the_normalised_maps(combine, flip_merge, norm):
    cams, tags, cams2 = cam_inputs((3, 2, 2, 4, 6, 7), torch.float32, seed=2, fuse=True)
    m1, m2 = merged_reference(cams, flip_merge, norm), merged_reference(cams2, flip_merge, norm)
    assert_close_rel(cam_postprocess_reference(cams, tags, 0.3, flip_merge, norm, return_cams=True)[0], m1, CAM_ABS)
    bkg = torch.tensor([0.3, 0.55], device=DEVICE)
    got, label, conf = cam_postprocess_reference(cams, tags, bkg, flip_merge, norm, cams2, True, combine)
    want = combine_sources(m1, m2, combine)
    assert_close_rel(got, want, CAM_ABS)
    expected = {"fuse": torch.maximum((m1 + m2) / 2, m2), "avg": (m1 + m2) / 2, "max": torch.maximum(m1, m2)}
    assert torch.equal(want, expected[combine])
    value, idx = (tags[:, :, None, None] * got).max(1)
    assert torch.equal(label, torch.where(value <= bkg[:, None, None], 0, idx + 1))
    assert torch.equal(conf, torch.maximum(value, bkg[:, None, None]))
    # the default combine is the paper's fusion (4.19)
    default, _, _ = cam_postprocess_reference(cams, tags, bkg, flip_merge, norm, cams2, True)
    assert torch.equal(default, cam_postprocess_reference(cams, tags, bkg, flip_merge, norm, cams2, True, "fuse")[0])


def test_combine_sources_rules_on_normalised_maps():
    g = torch.Generator().manual_seed(4)
    m1, m2 = (normalize_maps(torch.randn(2, 3, 5, 6, generator=g), "minmax") for _ in range(2))
    fused = combine_sources(m1, m2, "fuse")
    assert_close_rel(fused, (torch.maximum(m1, m2) + m2) / 2, CAM_ABS)  # the code's form (D14)
    assert (fused >= m2).all() and (fused <= torch.maximum(m1, m2)).all()
    assert torch.equal(combine_sources(m1, m2, "avg"), (m1 + m2) / 2)
    assert torch.equal(combine_sources(m1, m2, "max"), torch.maximum(m1, m2))
    assert torch.equal(combine_sources(m1, m1, "fuse"), m1) and torch.equal(combine_sources(m1, m1, "avg"), m1)
    assert (combine_sources(m1, m2, "max") < 1).all() and NORM_EPS == 1e-5  # normalised inputs stay in [0, 1)
    with pytest.raises(ValueError, match="combine"):
        combine_sources(m1, m2, "sum")


@requires_triton
@pytest.mark.parametrize("combine", ["fuse", "avg", "max"])
@pytest.mark.parametrize(
    ("shape", "dtype", "flip_merge", "norm"),
    [
        ((2, 2, 2, 3, 33, 33), torch.float32, "sum", "max"),  # CoBra; two pixel blocks, the second partial
        ((2, 1, 2, 4, 7, 9), torch.float16, "max", "minmax"),  # no flip, min-max, half inputs
    ],
)
def test_cam_postprocess_combine_triton_matches_reference(shape, dtype, flip_merge, norm, combine):
    cams, tags, cams2 = cam_inputs(shape, dtype, seed=5, fuse=True)
    bkg = torch.tensor([0.05, 0.4], device=DEVICE)  # per-image scores (image 0 has no tag: all background)
    want = cam_postprocess(cams, tags, bkg, flip_merge, norm, cams2, True, "torch", combine)
    got = cam_postprocess(cams, tags, bkg, flip_merge, norm, cams2, True, "triton", combine)
    assert got[1].dtype == torch.int64 and got[0].dtype == got[2].dtype == torch.float32
    assert_close_rel(got[0], want[0], CAM_ABS)
    assert torch.equal(got[1], want[1])
    assert_close_rel(got[2], want[2], CAM_ABS)
    assert not (got[1] == 3).any()  # class 3 (index 2) only ties class 2, which comes first
    assert (got[1][1] > 0).any() and (got[1][1] == 0).any()
    if combine != "fuse":  # the three rules really differ on these inputs
        fused = cam_postprocess(cams, tags, bkg, flip_merge, norm, cams2, True, "torch", "fuse")[0]
        assert (got[0] - fused).abs().max() > 1e-3


@requires_triton
def test_cam_postprocess_background_wins_ties():
    cams, tags, _ = cam_inputs((2, 2, 2, 3, 6, 7), torch.float32, seed=3)
    _, label, conf = cam_postprocess(cams, tags, 0.0, backend="torch")
    bkg = conf.flatten(1)[:, 5].clone()  # each image's best class score at pixel 5 becomes its background score
    for backend in ("torch", "triton"):
        _, label, _ = cam_postprocess(cams, tags, bkg, return_cams=False, backend=backend)
        assert (label.flatten(1)[:, 5] == 0).all()


@requires_triton
def test_cam_postprocess_bits_do_not_depend_on_the_autotuned_config(monkeypatch):
    cams, tags, cams2 = cam_inputs((2, 2, 2, 3, 30, 21), torch.float32, seed=6, fuse=True)  # 630 px: partial blocks
    outputs = []
    for config in cam_post.CONFIGS:
        for kernel in (cam_post._extrema_kernel, cam_post._label_kernel):
            force_config(monkeypatch, kernel, config)
        outputs.append(cam_postprocess(cams, tags, 0.3, "sum", "minmax", cams2, return_cams=True, backend="triton"))
    for out in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outputs[0], strict=True))


def test_cam_postprocess_grid_puts_planes_on_axis_0():
    planes = 70000  # B * K beyond the 65535 programs CUDA allows on grid axes 1 and 2
    assert cam_post.pixel_grid(planes, 4, 512) == (planes,)
    assert cam_post.pixel_grid(planes, 1100, 512) == (3 * planes,)
    with pytest.raises(ValueError, match="axis 1"):
        check_grid((1, planes))  # the old layout: (pixel blocks, B * K)
    with pytest.raises(ValueError, match="axis 0"):
        cam_post.pixel_grid(2**20, 2**20, 512)


def test_cam_postprocess_without_cams_and_bad_inputs():
    cams, tags, _ = cam_inputs((1, 2, 2, 3, 4, 5), torch.float32)
    maps, label, conf = cam_postprocess(cams, tags, 0.5)
    assert maps is None and label.shape == conf.shape == (2, 4, 5)
    with pytest.raises(ValueError, match="tags"):
        cam_postprocess(cams, tags[:, :2], 0.5)
    with pytest.raises(ValueError, match="F = 1 or 2"):
        cam_postprocess(torch.cat([cams, cams[:, :1]], 1), tags, 0.5)
    with pytest.raises(ValueError, match="flip_merge"):
        cam_postprocess(cams, tags, 0.5, flip_merge="mean")
    with pytest.raises(ValueError, match="combine"):
        cam_postprocess(cams, tags, 0.5, cams2=cams, combine="sum")
    with pytest.raises(ValueError, match="one score per image"):
        cam_postprocess(cams, tags, torch.zeros(3))


# ---------------------------------------------------------------------------------------------------- dispatch


def test_backend_for_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("WSSS_KERNELS", raising=False)
    assert backend_for(cpu) == "torch"  # automatic: Triton only when every tensor is on CUDA
    assert backend_for(cpu, backend="torch") == "torch"
    monkeypatch.setenv("WSSS_KERNELS", "torch")
    assert backend_for(cpu) == "torch"
    monkeypatch.setenv("WSSS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="WSSS_KERNELS"):
        backend_for(cpu)
    with pytest.raises(ValueError, match="backend"):
        backend_for(cpu, backend="numba")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError):
        backend_for(cpu, backend="triton")  # no CUDA and no interpreter (or no triton at all)

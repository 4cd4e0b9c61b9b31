"""SeCo losses against direct per-row transcriptions of §3.8-§3.11 (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.train.seco_losses import label_to_aff_mask, lig_loss, lil_loss, ptc_loss, seg_loss


def lil_reference(q, k, f, g, tau=0.08, tau_base=0.08):
    """(3.5)-(3.13) one anchor at a time, written from the equations."""
    n, m = q.shape[0], k.shape[0]
    f = f.clone()
    rows, p_all = [], []
    for i in range(n):
        a = torch.stack([q[i] @ k[j] / tau for j in range(m)])
        l = a - a.max().detach()
        if f[i] == -1:
            l = l * 0
        p = torch.stack([l[j] if (f[i] != -1 and f[i] == g[j]) else l[j] * 0 for j in range(m)])
        mu = p.sum() / m
        n_pos = sum(1 for j in range(m) if p[j] >= mu)
        n_neg = m - n_pos
        if n_neg > 10 * (n_pos + 1e-6):
            f[i] = 0
            p = p * 0
        l = torch.stack([l[j] * 0 if g[j] == -1 else l[j] for j in range(m)])
        e = [torch.exp(l[j]) for j in range(m)]
        d = sum(x for x in e if x.item() != 1.0)
        rows.append((p.sum(), d))
        p_all.append(p)
    z = sum(int((p != 0).sum()) for p in p_all)
    total = q.sum() * 0
    for p_sum, d in rows:
        r = p_sum - m * torch.log(torch.as_tensor(d) + 1e-12)
        if z > 0 and float(torch.as_tensor(d).detach()) > 0 and r.detach().item() < 0:
            total = total + r / z
    return -(tau / tau_base) * total / n, f


def _bank(seed: int, n: int = 6, m: int = 14, d: int = 8, tags=(-1, 0, 1, 2, 3)):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    k = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    choice = torch.tensor(tags)
    f = choice[torch.randint(len(tags), (n,), generator=gen)]
    g = torch.cat([f, choice[torch.randint(len(tags), (m - n,), generator=gen)]])  # own keys carry own tags
    return q, k, f, g


@pytest.mark.parametrize("seed", range(6))
def test_lil_code_mode_matches_transcription(seed):
    q, k, f, g = _bank(seed)
    loss, f_rev, _ = lil_loss(q, k, f, g)
    (grad,) = torch.autograd.grad(loss, q, allow_unused=True)
    q2 = q.detach().clone().requires_grad_()
    want, f_want = lil_reference(q2, k, f, g)
    (grad_want,) = torch.autograd.grad(want, q2, allow_unused=True)
    torch.testing.assert_close(loss, want)
    assert torch.equal(f_rev, f_want)
    torch.testing.assert_close(grad if grad is not None else torch.zeros_like(q), grad_want
                               if grad_want is not None else torch.zeros_like(q))  # fmt: skip


def test_lil_noisy_filter_rewrites_tags_and_zero_loss_stays_attached():
    # one anchor whose tag all 22 keys share; 21 equal keys sit below the row mean, only its own key (l = 0) is
    # above: n- = 21 > 10 (n+ + 1e-6) = 10, so the filter fires (3.8)
    q = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64, requires_grad=True)
    own = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
    others = torch.tensor([[-1.0, 0, 0, 0]] * 21, dtype=torch.float64)
    k = torch.cat([own, others])
    f, g = torch.tensor([2]), torch.full((22,), 2)
    loss, f_rev, noisy = lil_loss(q, k, f, g)
    assert noisy.tolist() == [True] and f_rev.tolist() == [0]
    assert loss.item() == 0.0 and loss.requires_grad  # a zero connected to the graph
    loss.backward()
    assert torch.all(q.grad == 0)


def test_lil_supcon_matches_equation_3_14():
    q, k, f, g = _bank(3, tags=(1, 2))
    loss, f_rev, noisy = lil_loss(q, k, f, g, impl="supcon")
    logits = q @ k.t() / 0.08
    terms, anchors = [], 0
    for i in range(q.shape[0]):
        if f_rev[i] == -1 or noisy[i]:
            continue
        anchors += 1
        cand = [j for j in range(k.shape[0]) if g[j] != -1 and j != i]
        pos = [j for j in cand if g[j] == f_rev[i]]
        if not pos:
            continue
        log_den = torch.logsumexp(logits[i, cand], 0)
        terms.append(torch.stack([logits[i, p] - log_den for p in pos]).mean())
    want = -torch.stack(terms).sum() / anchors
    torch.testing.assert_close(loss, want)


def lig_reference(q, protos, f, tau=0.1):
    present = {int(t) for t in f if t >= 1}
    total, count = q.sum() * 0, 0
    for i in range(q.shape[0]):
        if f[i] < 1:
            continue
        count += 1
        l = q[i] @ protos.t() / tau
        own = l[int(f[i]) - 1]
        if own.item() == 0:
            continue
        den = sum(torch.exp(l[c - 1]) for c in present if torch.exp(l[c - 1]).item() != 1.0)
        total = total + own - torch.log(den + 1e-12)
    return -total / (count if count else q.shape[0])


@pytest.mark.parametrize("seed", range(4))
def test_lig_matches_transcription_values_and_gradients(seed):
    q, _, f, _ = _bank(seed)
    protos = F.normalize(torch.randn(5, q.shape[1], dtype=torch.float64), dim=1)
    loss = lig_loss(q, protos, f)
    want = lig_reference(q, protos, f)
    torch.testing.assert_close(loss, want)
    if loss.requires_grad and want.requires_grad:
        torch.testing.assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(want, q)[0])


def test_lig_without_positive_rows_is_zero():
    q = F.normalize(torch.randn(3, 4), dim=1)
    assert lig_loss(q, torch.randn(5, 4), torch.tensor([0, -1, 0])).item() == 0.0


def test_label_to_aff_mask_appendix_b_oracle():
    mask = label_to_aff_mask(torch.tensor([[[0, 0, 3, 255]]]))[0]
    assert mask[0].tolist() == [255, 1, 0, 255]
    assert mask[2].tolist() == [0, 0, 255, 255]
    assert mask[3].tolist() == [255, 255, 255, 255]


def test_ptc_matches_direct_sums():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    label = torch.tensor([[[0, 1, 1], [255, 0, 1]], [[2, 2, 0], [0, 0, 255]]])
    aff = label_to_aff_mask(label)  # the (1.7) pair mask, the oracle's pair membership
    loss = ptc_loss(feats, label)
    pos = neg = 0.0
    n_pos = n_neg = 0
    for b in range(2):
        t = feats[b].flatten(1)
        for i in range(6):
            for j in range(6):
                c = abs(float(t[:, i] @ t[:, j] / (t[:, i].norm() * t[:, j].norm())))
                if aff[b, i, j] == 1:
                    pos, n_pos = pos + c, n_pos + 1
                elif aff[b, i, j] == 0:
                    neg, n_neg = neg + c, n_neg + 1
    assert math.isclose(loss.item(), 0.5 * (1 - pos / (n_pos + 1)) + 0.5 * neg / (n_neg + 1), rel_tol=1e-9)


def test_seg_loss_balances_parts_and_handles_empty_ones():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :2] = 2
    target[0, 2:3] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, target, ignore_index=255, reduction="none")
    want = 0.5 * (ce[target == 0].mean() + ce[(target > 0) & (target != 255)].mean())
    torch.testing.assert_close(seg_loss(logits, target), want, rtol=1e-5, atol=1e-6)
    only_bg = torch.zeros(1, 8, 8, dtype=torch.long)
    assert torch.isfinite(seg_loss(logits, only_bg))  # ToCo's version gives NaN here


def test_dense_energy_matches_brute_force_and_official_gradient():
    from wsss.train.seco_losses import dense_energy_loss

    torch.manual_seed(0)
    image = torch.rand(2, 3, 8, 10) * 255
    logits = torch.randn(2, 3, 8, 10, dtype=torch.float32, requires_grad=True)
    valid = torch.ones(2, 8, 10, dtype=torch.bool)
    valid[1, :, 8:] = False
    target = torch.randint(0, 3, (2, 8, 10))
    target[0, 0, :4] = 255
    loss = dense_energy_loss(image, logits, valid, target, chunk=7)  # several blocks
    # brute force at the downscaled resolution (4 x 5), straight from (3.20)-(3.21)
    img = F.interpolate(image, size=(4, 5), mode="nearest")
    probs = F.interpolate(logits.detach().softmax(1), size=(4, 5), mode="bilinear", align_corners=False)
    roi = F.interpolate(valid[:, None].float(), size=(4, 5), mode="nearest")[:, 0]
    tgt = F.interpolate(target[:, None].float(), size=(4, 5), mode="nearest")[:, 0]
    total = 0.0
    for b in range(2):
        gate = (roi[b] - probs[b].amax(0)).masked_fill(tgt[b] == 255, 1).clamp_min(0)
        sm = probs[b] * roi[b]
        for p in range(20):
            py, px = divmod(p, 5)
            for q in range(20):
                qy, qx = divmod(q, 5)
                d2 = ((px - qx) ** 2 + (py - qy) ** 2) / 50.0**2 + (
                    (img[b, :, py, px] - img[b, :, qy, qx]) ** 2
                ).sum() / 225
                total -= float((sm[:, py, px] * sm[:, qy, qx]).sum() * torch.exp(-0.5 * d2) * gate[py, px])
    assert math.isclose(loss.item(), total / 2, rel_tol=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- bf16 autocast (§3.5)

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _near_duplicates(n: int = 48, m: int = 480, d: int = 64, classes: int = 4, seed: int = 0):
    """Anchors, keys and prototypes clustered by class, as SeCo's own keys are: many logits near the row maximum."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, d, generator=gen), dim=1)
    f, g = torch.arange(n) % classes + 1, torch.arange(m) % classes + 1
    f[::7], g[::5] = -1, 0

    def around(tags):
        return F.normalize(centres[tags.clamp_min(1) - 1] + 0.05 * torch.randn(len(tags), d, generator=gen), dim=1)

    return around(f), around(g), f, g, centres


def test_bf16_contrast_logits_tie_with_the_row_maximum():
    """Why LIL and LIG run in float32: bf16 q @ k / tau ties with the row maximum, which (3.10) ``e != 1`` drops."""
    q, k, *_ = _near_duplicates()
    with torch.autocast(**BF16):
        low = q @ k.t() / 0.08
    exact = q @ k.t() / 0.08
    ties = lambda a: (a == a.amax(1, keepdim=True)).sum(1)  # noqa: E731
    assert low.dtype == torch.bfloat16 and ties(low).max() > 1
    assert (ties(exact) == 1).all()


def test_lil_and_lig_under_bf16_autocast_equal_float32():
    import inspect

    q, k, f, g, centres = _near_duplicates()
    want_lil, want_f, _ = lil_loss(q, k, f, g)
    want_lig = lig_loss(q, centres, want_f)
    with torch.autocast(**BF16):
        lil, f_revised, _ = lil_loss(q.bfloat16(), k, f, g)  # the projection head's bf16 output is widened
        lig = lig_loss(q, centres, f_revised)
        naive = inspect.unwrap(lil_loss)(q, k, f, g)[0], inspect.unwrap(lig_loss)(q, centres, f_revised)
    assert lil.dtype == lig.dtype == torch.float32 and torch.equal(f_revised, want_f)
    torch.testing.assert_close(lil, lil_loss(q.bfloat16().float(), k, f, g)[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(lig, want_lig, rtol=1e-6, atol=0)
    # the test can fail: without the float32 guard autocast moves both losses far beyond that tolerance
    for low, exact in zip(naive, (want_lil, want_lig), strict=True):
        assert abs(low.float() - exact) > 1e-4 * abs(exact)

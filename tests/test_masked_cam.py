"""The mask-supervised CAM objective that pre-trains the shipped tiny backbones (``cam-tiny-pretrain``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wsss.train.cam import MaskedCAMObjective, token_fractions


def random_mask(b: int, h: int, w: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, k + 1, (b, h, w), generator=g)
    return torch.where(torch.rand(b, h, w, generator=g) < 0.15, 255, mask)


def test_token_fractions_match_a_loop_over_tokens():
    mask, k, grid = random_mask(2, 19, 26, 3), 3, (4, 6)  # floors: 4 px patches, the last rows and columns dropped
    fractions, valid = token_fractions(mask, k, grid)
    for b in range(2):
        for i in range(grid[0]):
            for j in range(grid[1]):
                patch = mask[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                assert math.isclose(valid[b, 0, i, j].item(), (patch != 255).float().mean().item(), abs_tol=1e-6)
                for c in range(k):
                    want = (patch == c + 1).float().mean().item()
                    assert math.isclose(fractions[b, c, i, j].item(), want, abs_tol=1e-6)


class TinyCAM(torch.nn.Module):
    """A CAM network's interface: logits (B, K) by GMP and raw CAMs (B, K, h, w) at patch 4."""

    def __init__(self, k: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, k, 4, 4)

    def forward(self, x):
        cams = self.proj(x)
        return cams.amax((2, 3)), cams


def test_masked_objective_matches_its_transcription():
    torch.manual_seed(0)
    k, net = 3, TinyCAM(3)
    image, mask = torch.randn(2, 3, 16, 16), random_mask(2, 16, 16, k, seed=1)
    mask[1][mask[1] == 2] = 0  # image 1 holds no class 2: its tag must be off
    out = MaskedCAMObjective(net, {"pretrain": {"dense_weight": 0.5}})(net, {"image": image, "mask": mask}, 0)

    logits, cams = net(image)
    tags = torch.stack([torch.tensor([float((mask[b] == c + 1).any()) for c in range(k)]) for b in range(2)])
    assert tags[1, 1] == 0
    total, weight = 0.0, 0.0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                patch = mask[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                v = (patch != 255).float().mean()
                for c in range(k):
                    m = (patch == c + 1).float().sum() / (patch != 255).float().sum().clamp_min(1)
                    total += v * F.binary_cross_entropy_with_logits(cams[b, c, i, j], m)
                    weight += v
    dense = total / weight
    cls = F.multilabel_soft_margin_loss(logits, tags)
    torch.testing.assert_close(out["dense"], dense)
    torch.testing.assert_close(out["cls"], cls)
    torch.testing.assert_close(out["loss"], cls + 0.5 * dense)
    out["loss"].backward()
    assert net.proj.weight.grad.abs().sum() > 0

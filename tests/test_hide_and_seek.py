"""Hide-and-Seek for the plain CAM objective (``data.hide``): whole cells hidden, at the asked rate."""

from __future__ import annotations

import torch

from wsss.train.cam import CAMObjective, hide_patches


def test_hide_patches_hides_whole_cells_at_the_asked_rate_on_any_image_size():
    torch.manual_seed(0)
    image = torch.rand(64, 3, 37, 50) + 1.0  # never 0, so a zero marks a hidden pixel; 37, 50 not multiples of 8
    out = hide_patches(image, 0.3, 8)
    hidden = out == 0
    assert torch.equal(out[~hidden], image[~hidden])
    assert torch.equal(hidden, hidden[:, :1].expand_as(hidden))  # every channel of a hidden pixel
    cells = hidden[:, 0].unfold(1, 8, 8).unfold(2, 8, 8)  # the full 8 x 8 cells: all hidden or none
    assert torch.equal(cells.all(-1).all(-1), cells.any(-1).any(-1))
    assert abs(hidden.float().mean().item() - 0.3) < 0.03
    assert torch.equal(hide_patches(image, 0.0, 8), image)


class _Net(torch.nn.Module):
    """Logits that are the image's mean per channel, so the loss shows what the objective fed the network."""

    def forward(self, x):
        return x.mean((2, 3)), x


def test_the_cam_objective_hides_only_when_asked():
    batch = {"image": torch.rand(4, 3, 16, 16) + 1.0, "labels": torch.tensor([[1.0, 0, 1]] * 4)}
    plain = CAMObjective(None, {"data": {}})(_Net(), batch, 0)["loss"]
    shown = CAMObjective(None, {"data": {"hide": 0.0, "hide_cell": 4}})(_Net(), batch, 0)["loss"]
    hidden = CAMObjective(None, {"data": {"hide": 1.0, "hide_cell": 4}})(_Net(), batch, 0)["loss"]
    zeros = CAMObjective(None, {"data": {}})(_Net(), {**batch, "image": torch.zeros(4, 3, 16, 16)}, 0)["loss"]
    assert torch.equal(plain, shown)
    assert torch.equal(hidden, zeros) and not torch.equal(hidden, plain)

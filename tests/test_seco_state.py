"""SeCo training state: EMA, prototype bank, key queue, schedule, projection head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.seco import ProjectionHead
from wsss.train.seco_state import KeyQueue, PrototypeBank, ema_update, loss_weights


def test_ema_update():
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    pairs = zip(teacher.parameters(), student.parameters(), strict=True)
    want = [0.9 * t.detach() + 0.1 * s.detach() for t, s in pairs]
    ema_update(teacher, student, 0.9)
    for got, exp in zip(teacher.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach(), exp)


def test_prototype_update_equals_the_sequential_loop():
    torch.manual_seed(0)
    bank = PrototypeBank(4, 6, momentum=0.9)
    start = bank.prototypes.clone()
    tokens = torch.randn(7, 6)
    labels = torch.tensor([2, -1, 2, 4, 2, -1, 4])
    got = bank.update(tokens, labels)
    want = start.clone()
    for t, c in zip(tokens, labels, strict=True):  # (3.4) in order
        if c != -1:
            want[c - 1] = 0.9 * want[c - 1] + 0.1 * t
    torch.testing.assert_close(got, F.normalize(want, dim=1))
    assert torch.allclose(got.norm(dim=1), torch.ones(4))  # unseen classes are normalised too


def test_queue_ring_buffer():
    queue = KeyQueue(6, 2)
    torch.testing.assert_close(queue.keys.norm(dim=0), torch.ones(2))  # normalised along dim 0 (Q3.7)
    for step in range(4):
        queue.enqueue(torch.full((3, 2), float(step)), torch.full((3,), step))
    assert queue.tags.tolist() == [2, 2, 2, 3, 3, 3] and queue.ptr.item() == 0
    with pytest.raises(ValueError, match="not a multiple"):
        queue.enqueue(torch.zeros(4, 2), torch.zeros(4))


def test_schedule_follows_table_3_13():
    assert loss_weights(1000) == {"cls": 1.0, "cls_aux": 1.0, "ptc": 0.3, "lig": 0.0, "lil": 0.0, "seg": 0.0,
                                  "reg": 0.0}  # fmt: skip
    assert loss_weights(1001)["lil"] == 0.5 and loss_weights(2000)["seg"] == 0.0 and loss_weights(2001)["seg"] == 0.12
    coco = loss_weights(8000, "coco")
    assert coco["ptc"] == 0.0 and loss_weights(8001, "coco")["ptc"] == 0.2 and loss_weights(12001, "coco")["lil"] == 0.3


def test_projection_head_is_unit_norm_with_official_keys():
    head = ProjectionHead(16, 32, 8)
    assert sorted(head.state_dict()) == [f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))

"""One SeCo training step (§3.2): separate (crop and tag) and conquer (tag-guided contrast).

The student is ``SeCoNet``; this objective owns the training-only parts: the EMA key encoder ``E_k``, the
projection head ``phi`` and its EMA teacher ``phi_t``, the prototype bank and the key queue.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..cam.labels import box_mask, cam_to_label
from ..cam.par import refine_with_background
from ..cam.pipeline import forward_pyramid, normalized_maps, stack_maps, tensor_pyramid
from ..data.transforms import denormalize, to_uint8_levels
from ..models import CAMSettings
from ..models.backbone import forward_tokens
from ..models.seco import ProjectionHead, SeCoNet
from .precision import float32
from .seco_crops import crop_and_tag, crop_windows
from .seco_losses import dense_energy_loss, lig_loss, lil_loss, ptc_loss, seg_loss
from .seco_state import KeyQueue, PrototypeBank, ema_update, loss_weights

ENERGY_SCALE = 1e-7  # lambda_e of (3.21)


class _BothCAMs(nn.Module):
    """Main and auxiliary CAMs in one pass, for the CAM path."""

    def __init__(self, model: SeCoNet):
        super().__init__()
        self.model, self.patch_size = model, model.patch_size

    def forward(self, x):
        return self.model(x, mode="cams")


class SeCoObjective(nn.Module):
    """``__call__(net, batch, step)`` returns the weighted total (3.22) as ``"loss"`` and every term by name."""

    def __init__(self, model: SeCoNet, cfg: dict):
        super().__init__()
        s = cfg["seco"]
        self.cfg, self.num_fg = s, model.classifier.out_channels
        dim = model.backbone.embed_dim
        self.key_encoder = copy.deepcopy(model.backbone).requires_grad_(False)  # E_k
        # phi maps to the backbone width: LIG compares its outputs with CLS-space prototypes (quirk Q3.5)
        self.head = ProjectionHead(dim, s["proj_hidden"], dim)
        self.head_teacher = copy.deepcopy(self.head).requires_grad_(False)  # phi_t
        self.bank = PrototypeBank(self.num_fg, dim, s["proto_m"])
        self.queue = KeyQueue(s["queue"], dim)
        self.cam = CAMSettings.for_family("seco", cfg["cam"]).replace(flip=True)  # training CAMs flip (§3.2)

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates at the head learning rate (phi)."""
        return list(self.head.parameters())

    def forward(self, net: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        s = self.cfg
        model = net.module if hasattr(net, "module") else net
        x, y, box = batch["image"], batch["labels"], batch["img_box"]
        weights = loss_weights(step, s["schedule"])
        # the PAR labels feed only seg and reg: before those switch on they are skipped and logged as 0 (exact,
        # as a zero weight contributes nothing); the contrast always runs, since it moves the queue and teachers
        dense = weights["seg"] > 0 or weights["reg"] > 0
        pseudo = self.pseudo_labels(model, x, y, box, step, dense)
        out = net(x, mode="train")
        zero = 0 * out["seg"].sum()  # keeps the decoder in the graph (DDP expects every parameter to get a gradient)
        losses = {
            "cls": F.multilabel_soft_margin_loss(out["logits"], y),
            "cls_aux": F.multilabel_soft_margin_loss(out["aux_logits"], y),
            "ptc": self._ptc(out["feats"], pseudo["aux_cam"], y, box),
            "seg": seg_loss(out["seg"], pseudo["seg_label"]) if dense else zero,
            "reg": ENERGY_SCALE * self._energy(x, out["seg"], box, pseudo["seg_label"]) if dense else zero,
        }
        losses["lil"], losses["lig"] = self._contrast(net, model, batch, out["cls"], pseudo, step)
        losses["loss"] = sum(weights[k] * losses[k] for k in weights)
        return losses

    @torch.no_grad()
    @float32  # the CAMs are thresholded at 0.25 / 0.5 / 0.7: under bf16 autocast pixels near them would flip
    def pseudo_labels(self, model, x, y, box, step: int, dense: bool = True) -> dict[str, torch.Tensor]:
        """§3.2 steps 2-5 as a dict: ``aux_cam``, PAR-refined ``seg_label`` (None unless ``dense``), the ``roi``
        (-1 uncertain), and the crops' ``positions`` and ``flags``; in float32 whatever the autocast."""
        s, k = self.cfg, self.num_fg
        raw = forward_pyramid(_BothCAMs(model), tensor_pyramid(x, self.cam), self.cam)
        fused = normalized_maps(stack_maps(raw, tuple(x.shape[-2:]), self.cam), self.cam)  # (1.4), (1.5)
        cam, aux_cam = fused[:, :k], fused[:, k:]
        seg_label = None
        if dense:
            seg_source = aux_cam if step < s["seg_from_aux_until"] else cam  # COCO: aux CAM until 12 000 (§3.2 step 3)
            valid, _ = cam_to_label(seg_source, y, s["bkg"], s["high"], s["low"], box, ignore_mid=True)
            seg_label = refine_with_background(to_uint8_levels(x) / 255, valid, y, s["high"], s["low"], box)
        roi_source = aux_cam if step < s["cam2mask"] else cam
        _, roi = cam_to_label(roi_source, y, s["bkg"], s["high"], s["low"], box, ignore_mid=True, uncertain=-1)
        # crop positions are a function of the step (not of the global RNG), like the code's per-call reseed (Q3.1);
        # drawn where the ROI is, so nothing crosses to the host
        rng = torch.Generator(roi.device).manual_seed(step)
        positions, flags = crop_and_tag(roi, k, s["n_crops"], s["local_crop"], s["tag_thresh"], generator=rng)
        return {"aux_cam": aux_cam, "seg_label": seg_label, "roi": roi, "positions": positions, "flags": flags}

    def _ptc(self, feats, aux_cam, y, box) -> torch.Tensor:
        """§3.10: pairs from the aux CAM at the token grid, applied to the final tokens."""
        s = self.cfg
        small = F.interpolate(aux_cam, size=feats.shape[-2:], mode="bilinear", align_corners=False)
        grid_box = box // (aux_cam.shape[-1] // feats.shape[-1]) if s["ptc_box_rescale"] else box  # quirk Q1.2
        _, label = cam_to_label(small, y, s["bkg"], s["high"], s["low"], grid_box, ignore_mid=True)
        return ptc_loss(feats, label)

    def _energy(self, x, seg, box, seg_label) -> torch.Tensor:
        up = F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return dense_energy_loss(denormalize(x) * 255, up, box_mask(box, x.shape[-2:], x.device),
                                 seg_label, self.cfg["energy_sigma_xy"], self.cfg["energy_sigma_rgb"])  # fmt: skip

    def _contrast(self, net, model, batch, cls_x, pseudo, step: int):
        """§3.5 steps 2-8 and the LIL / LIG losses (§3.8, §3.9)."""
        s = self.cfg
        b, n = cls_x.shape[0], s["n_crops"]
        if step >= s["proto_start"]:  # from every rank, in rank order (§3.6)
            prototypes = self.bank.update(_gather(cls_x.detach()), _gather(batch["label_idx"]))
        else:
            prototypes = self.bank.prototypes.clone()
        queries = crop_windows(batch["image"], pseudo["positions"], s["local_crop"]).flatten(0, 1)  # (n B, ...)
        keys_in = crop_windows(batch["strong"], pseudo["positions"], s["local_crop"]).flatten(0, 1)
        cls_w = net(batch["weak"], mode="cls")
        cls_q = net(queries, mode="cls").unflatten(0, (n, b)).transpose(0, 1)  # (B, n, D)
        global_views = torch.stack([cls_x, cls_w], dim=1)  # (B, 2, D)
        q = self.head(torch.cat([global_views, cls_q], dim=1).flatten(0, 1))  # Q_s, (12B, d), per image [g, g, c..]
        ema_update(self.key_encoder, model.backbone, s["momentum"])
        with torch.no_grad():
            cls_k = forward_tokens(self.key_encoder, keys_in)[0][:, 0].unflatten(0, (n, b)).transpose(0, 1)
            ema_update(self.head_teacher, self.head, s["momentum"])
            k_new = self.head_teacher(torch.cat([global_views.detach(), cls_k], dim=1).flatten(0, 1))
        f = pseudo["flags"].flatten()
        self.queue.enqueue(_gather(k_new), _gather(f))  # every rank's keys, before the losses (quirk Q3.6)
        keys, g = torch.cat([k_new, self.queue.keys]), torch.cat([f, self.queue.tags])
        l_lil, f_revised, _ = lil_loss(q, keys, f, g, s["tau_lil"], s["tau_lil"], s["lil_impl"])
        l_lig = lig_loss(q, prototypes, f_revised, s["tau_lig"], s["tau_lig"])
        return l_lil, l_lig


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over all ranks (no gradient), or return it as is in a single process.

    The official batch shuffle around the teacher head only matters for BatchNorm, which ``phi`` does not have
    (quirk Q3.9), so it is left out.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)

"""The one report of a weight import: what was loaded, skipped (and why), missing, unexpected or mismatched."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checkpoint import CheckpointError


@dataclass
class LoadReport:
    """Every weight import returns one; ``check()`` turns an incomplete one into a one-line CheckpointError."""

    source: str
    layout: str  # "wsss", "seco", "cobra", "timm-vit", "torchvision-resnet", ...
    loaded: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason (training-only, classifier head, ...)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key (file shape) != (network shape)"
    resized: list[str] = field(default_factory=list)  # position embeddings resampled to the network's grid
    aliases: int = 0  # duplicate keys of one tensor merged (CoBra's CNN file stores its trunk three times)
    initialised: list[str] = field(default_factory=list)  # absent training-only tensors set deterministically

    def __str__(self) -> str:
        head = f"{self.source} ({self.layout}): loaded {self.loaded} tensors"
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            head += f", skipped {len(self.skipped)} ({'; '.join(reasons)})"
        if self.aliases:
            head += f", merged {self.aliases} aliased copies"
        if self.resized:
            head += f", resampled {', '.join(self.resized)}"
        lines = [head]
        if self.initialised:
            lines.append(f"  initialised (not in the file; training-only): {', '.join(self.initialised)}")
        for name in ("missing", "unexpected", "mismatched"):
            if items := getattr(self, name):
                lines.append(f"  {name} ({len(items)}): {_few(items)}")
        return "\n".join(lines)

    def check(self, allow_missing: bool = False, allow_unexpected: bool = False) -> LoadReport:
        """Raise one line naming the file and what does not fit; return self when everything fits."""
        problems = []
        if self.mismatched:
            problems.append(f"shape mismatches ({len(self.mismatched)}): {_few(self.mismatched, 3)}")
        if self.missing and not allow_missing:
            problems.append(f"missing ({len(self.missing)}): {_few(self.missing, 3)}")
        if self.unexpected and not allow_unexpected:
            problems.append(f"unexpected ({len(self.unexpected)}): {_few(self.unexpected, 3)}")
        if problems:
            raise CheckpointError(f"{self.source}: the {self.layout} weights do not fit the network: "
                                  + "; ".join(problems))  # fmt: skip
        return self


def fit_state(model: torch.nn.Module, mapped: dict[str, torch.Tensor], report: LoadReport,
              optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:  # fmt: skip
    """Tensors of ``mapped`` that fit ``model`` by name and shape; fills the report's lists."""
    target = model.state_dict()
    fitting = {}
    for key, tensor in mapped.items():
        if key not in target:
            report.unexpected.append(key)
        elif tensor.shape != target[key].shape:
            report.mismatched.append(f"{key} {tuple(tensor.shape)} != {tuple(target[key].shape)}")
        else:
            fitting[key] = tensor.to(target[key].dtype)
    report.missing = [k for k in target if k not in fitting and k not in optional]
    report.loaded = len(fitting)
    return fitting


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")

"""A dataset's images paired with a folder of pseudo-masks (``wsss label``, ``wsss cobra-masks`` or any palette PNGs).

The masks replace the dataset's own (ground-truth) masks: ``DIR/ID.png`` for every image id, VOC palette or plain
class indices (``wsss.data.palette.read_label_png``), 255 ignored; image-level tags are those of the masks.
"""

from __future__ import annotations

from pathlib import Path

from .datasets import DatasetError, WSSSDataset


class MaskedDataset(WSSSDataset):
    """``base``'s images with the masks of ``masks_dir``; a missing mask is refused here, in one line, and a mask of
    another size than its image when it is read."""

    def __init__(self, base: WSSSDataset, masks_dir: str | Path):
        folder = Path(masks_dir)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such masks folder")
        present = {p.stem for p in folder.glob("*.png")}
        missing = [i for i in base.ids if i not in present]
        if missing:
            raise DatasetError(f"{folder}: no mask for {len(missing)} of {len(base)} images, e.g. "
                               f"{folder / (missing[0] + '.png')}")  # fmt: skip
        super().__init__(base.classes, list(base.ids), [base.image_path(i) for i in range(len(base))],
                         [folder / f"{i}.png" for i in base.ids])  # fmt: skip
        self.base, self.masks_dir = base, folder

    def __repr__(self) -> str:
        return f"MaskedDataset({self.base!r}, masks {self.masks_dir})"

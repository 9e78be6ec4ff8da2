"""Qwen2-VL-family image preprocessing by lookup table: the image processor's numbers, faster.

For an 8-bit RGB image that needs no resizing (its size already is what ``smart_resize`` gives),
the Qwen2-VL image processor's work is elementwise (rescale, then normalise, per channel) and a
fixed reordering into patches (``patchify``). :class:`LookupPixels` therefore computes the
processor's own ``rescale`` and ``normalize`` once, on the 256 possible values of each channel,
and then turns a whole batch of same-size images into ``pixel_values`` with one table lookup and
one reshape, where the processor loops over images in NumPy.

It returns ``None`` for anything else (another mode, a size that needs resizing), and the caller
uses the processor. The caller also checks it against the processor once per image size
(:meth:`LookupPixels.probe` makes an image holding every value of every channel), since the
table only stands in for the processor where both give the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

_ATTRS = (
    "patch_size",
    "merge_size",
    "temporal_patch_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


@dataclass(frozen=True)
class LookupPixels:
    """``pixel_values`` and ``image_grid_thw`` of RGB images by table lookup (see the module)."""

    table: torch.Tensor  # [3 * 256] float32: channel c, value v at c * 256 + v
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    #: the processor module's ``smart_resize(h, w, factor, min_pixels, max_pixels)``
    smart_resize: Callable[..., tuple[int, int]]

    @classmethod
    def from_processor(cls, image_processor) -> LookupPixels | None:
        """The table of a Qwen2-VL-family image processor (None: not one, or one this cannot mirror)."""
        import inspect
        import sys

        ip = image_processor
        if ip is None or not all(hasattr(ip, a) for a in _ATTRS):
            return None
        if not all(callable(getattr(ip, m, None)) for m in ("rescale", "normalize", "patchify")):
            return None
        smart = getattr(sys.modules.get(type(ip).__module__), "smart_resize", None)
        size = getattr(ip, "size", None)
        try:
            lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
        except (KeyError, TypeError, ValueError):
            return None
        if smart is None or "factor" not in inspect.signature(smart).parameters:
            return None
        x = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # C H W
        if ip.do_rescale:
            x = ip.rescale(x, ip.rescale_factor)
        if ip.do_normalize:
            x = ip.normalize(x, ip.image_mean, ip.image_std)
        x = np.asarray(x, dtype=np.float32)  # as patchify casts
        if x.shape != (3, 1, 256):
            return None
        return cls(
            table=torch.from_numpy(np.ascontiguousarray(x[:, 0, :]).reshape(-1)),
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            min_pixels=lo,
            max_pixels=hi,
            smart_resize=smart,
        )

    def applies(self, image) -> bool:
        """An 8-bit RGB image whose size the processor keeps as it is."""
        if getattr(image, "mode", None) != "RGB":
            return False
        w, h = image.size
        factor = self.patch_size * self.merge_size
        got = self.smart_resize(
            h, w, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return tuple(got) == (h, w)

    def __call__(self, images: Sequence) -> dict[str, torch.Tensor] | None:
        """The processor's ``pixel_values`` [patches, C*T*P*P] and ``image_grid_thw`` [n, 3] for
        ``images`` in order, or None if any of them is not one this applies to."""
        if not images or not all(self.applies(im) for im in images):
            return None
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        grids = torch.tensor(
            [[1, im.size[1] // self.patch_size, im.size[0] // self.patch_size] for im in images],
            dtype=torch.long,
        )
        if len(by_size) == 1:
            ((w, h),) = by_size
            patches = self._same_size(images, h, w)
            return {"pixel_values": patches.flatten(0, 1), "image_grid_thw": grids}
        blocks: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for (w, h), idx in by_size.items():
            for i, block in zip(idx, self._same_size([images[i] for i in idx], h, w).unbind(0)):
                blocks[i] = block
        return {"pixel_values": torch.cat(blocks), "image_grid_thw": grids}

    def _same_size(self, images: Sequence, h: int, w: int) -> torch.Tensor:
        """The patches [n, patches per image, C*T*P*P] of images of one size (one lookup, one copy)."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        arr = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # N H W C, uint8
        n = arr.shape[0]
        flat = (arr.long() + torch.arange(3) * 256).view(-1)
        x = self.table.index_select(0, flat).view(arr.shape)  # N H W C, float32
        gh, gw = h // p, w // p
        # as patchify: (grid rows, grid cols, merge rows, merge cols, C, T, patch rows, patch cols)
        x = x.reshape(n, gh // m, m, p, gw // m, m, p, 3).permute(0, 1, 4, 2, 5, 7, 3, 6)
        x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], t, p, p)
        return x.reshape(n, gh * gw, 3 * t * p * p)

    @staticmethod
    def probe(w: int, h: int):
        """An RGB image of size ``w`` x ``h`` in which every channel takes all 256 values (once
        the image has at least 256 pixels), each channel in another order."""
        from PIL import Image

        k = np.arange(h * w, dtype=np.int64)
        rgb = np.stack([k % 256, (k * 7 + 3) % 256, (255 - k) % 256], -1).astype(np.uint8)
        return Image.fromarray(rgb.reshape(h, w, 3), "RGB")

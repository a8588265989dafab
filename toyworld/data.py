"""The toy world as tensors: captioned images generated in memory (no files) for the recipes."""

from __future__ import annotations


def toy_images(count: int, seed: int, size: int = 64, holdout: str = "default"):
    """(uint8 tensor N x 3 x size x size, captions) generated in memory, no files."""
    import numpy as np
    import torch

    from toyworld import world as tw

    hold = tw.holdout_by_name(holdout)
    arr = np.empty((count, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        img, label = tw.generate_one(seed, i, size, hold)
        arr[i] = np.asarray(img)
        captions.append(label.caption)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(images_u8):
    """uint8 images -> float in [-1, 1] (what the VAE encodes)."""
    return images_u8.float() / 127.5 - 1.0

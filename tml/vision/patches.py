"""Video frames ↔ 40×40×2 patches for the hMLP encoder.

Patch layout follows Inkling's ``pixel_values``: ``[N, T, P, P, C]`` with T = 2
(temporal patch size), P = 40, channels last. Patches are ordered time-major, then
row-major over the spatial grid.

Size policy (documented, tested):

* **Frames whose height/width is not a multiple of 40** are padded at the bottom and on
  the right up to the next multiple of 40 with ``pad_value`` (0 = black for uint8); the
  padding is cropped again by :func:`patches_to_frames`, so the round trip is exact.
  No resampling happens here: resize upstream if you want a fixed grid. (Inkling's own
  image processor always adds one extra, padded patch column, even for widths that are
  multiples of 40; tml does not copy that quirk.)
* **An odd number of frames**: the last frame is duplicated to complete the temporal
  pair. A single image ``[H, W, C]`` is duplicated into a pair, as Inkling does.
* dtypes are kept: uint8 in → uint8 out, float in → float out. :func:`normalize_patches`
  turns either into the model's float32 input (rescale to [0, 1], CLIP mean/std).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from einops import rearrange

PATCH_SIZE = 40
TEMPORAL_PATCH_SIZE = 2
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class PatchGrid(NamedTuple):
    """Where patches came from: grid sizes and the original frame geometry."""

    n_time: int   # temporal groups (pairs of frames)
    n_rows: int
    n_cols: int
    n_frames: int  # original number of frames (before duplication)
    height: int    # original frame height (before padding)
    width: int


def frames_to_patches(
    frames: np.ndarray,
    patch_size: int = PATCH_SIZE,
    temporal_size: int = TEMPORAL_PATCH_SIZE,
    pad_value: float = 0,
) -> tuple[np.ndarray, PatchGrid]:
    """Cut frames into patches.

    Args:
        frames: [F, H, W, C] video or [H, W, C] image; uint8 or float.
    Returns:
        patches [n_time * n_rows * n_cols, temporal_size, patch_size, patch_size, C] and
        the PatchGrid needed to invert.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4:
        raise ValueError(f"frames must be [F, H, W, C] or [H, W, C], got shape {frames.shape}")
    n_frames, height, width, _ = frames.shape
    if n_frames == 0 or height == 0 or width == 0:
        raise ValueError(f"empty frames: shape {frames.shape}")
    pad_t = -n_frames % temporal_size
    if pad_t:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad_t, axis=0)], axis=0)
    pad_h, pad_w = -height % patch_size, -width % patch_size
    if pad_h or pad_w:
        frames = np.pad(
            frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=pad_value
        )
    patches = rearrange(
        frames,
        "(nt t) (nh ph) (nw pw) c -> (nt nh nw) t ph pw c",
        t=temporal_size, ph=patch_size, pw=patch_size,
    )
    grid = PatchGrid(
        n_time=frames.shape[0] // temporal_size,
        n_rows=frames.shape[1] // patch_size,
        n_cols=frames.shape[2] // patch_size,
        n_frames=n_frames, height=height, width=width,
    )
    return np.ascontiguousarray(patches), grid


def patches_to_frames(patches: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Invert :func:`frames_to_patches`: [N, T, P, P, C] → [n_frames, height, width, C]."""
    expected = grid.n_time * grid.n_rows * grid.n_cols
    if patches.shape[0] != expected:
        raise ValueError(f"grid {grid} needs {expected} patches, got {patches.shape[0]}")
    frames = rearrange(
        patches, "(nt nh nw) t ph pw c -> (nt t) (nh ph) (nw pw) c",
        nt=grid.n_time, nh=grid.n_rows, nw=grid.n_cols,
    )
    return np.ascontiguousarray(frames[: grid.n_frames, : grid.height, : grid.width])


def normalize_patches(patches: np.ndarray) -> np.ndarray:
    """Model input: uint8 (0..255) or float (0..1) patches → float32, CLIP-normalised."""
    x = patches.astype(np.float32)
    if patches.dtype == np.uint8:
        x = x / 255.0
    return (x - CLIP_MEAN) / CLIP_STD

"""Vision front end: video frames ↔ 40×40×2 patches for the hMLP encoder."""

from tml.vision.patches import (
    PATCH_SIZE,
    TEMPORAL_PATCH_SIZE,
    PatchGrid,
    frames_to_patches,
    normalize_patches,
    patches_to_frames,
)

__all__ = [
    "PATCH_SIZE", "TEMPORAL_PATCH_SIZE", "PatchGrid",
    "frames_to_patches", "normalize_patches", "patches_to_frames",
]

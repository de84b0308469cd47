"""Vision patches: frames → 2×40×40 patches and back."""

import numpy as np
import pytest

from tml.vision import frames_to_patches, normalize_patches, patches_to_frames


@pytest.mark.parametrize("shape", [(4, 80, 120, 3), (3, 50, 90, 3), (1, 40, 40, 3), (2, 7, 200, 1)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_patch_round_trip_any_size_and_dtype(shape, dtype):
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 256, shape).astype(dtype) if dtype == np.uint8
              else rng.random(shape, dtype=np.float32))
    patches, grid = frames_to_patches(frames)
    assert patches.dtype == dtype
    assert patches.shape[1:] == (2, 40, 40, shape[-1])
    assert patches.shape[0] == -(-shape[0] // 2) * -(-shape[1] // 40) * -(-shape[2] // 40)
    assert np.array_equal(patches_to_frames(patches, grid), frames)


def test_patch_order_is_time_then_rows_then_columns():
    frames = np.zeros((2, 80, 80, 3), np.uint8)
    frames[:, 40:, :40] = 7  # bottom-left
    patches, _ = frames_to_patches(frames)
    assert [int(p.max()) for p in patches] == [0, 0, 7, 0]


def test_odd_frames_and_single_images_are_duplicated():
    img = np.arange(40 * 40 * 3, dtype=np.float32).reshape(40, 40, 3)
    patches, _ = frames_to_patches(img)
    assert patches.shape == (1, 2, 40, 40, 3)
    assert np.array_equal(patches[0, 0], patches[0, 1])
    three = np.stack([img, img + 1, img + 2])
    p3, _ = frames_to_patches(three)
    assert np.array_equal(p3[1, 0], p3[1, 1])


def test_padding_is_bottom_right_with_the_pad_value():
    frames = np.full((2, 50, 41, 3), 9, np.uint8)
    patches, grid = frames_to_patches(frames, pad_value=0)
    assert (grid.n_rows, grid.n_cols) == (2, 2)
    assert patches[3, :, 10:, 1:].max() == 0 and patches[0].min() == 9


def test_normalize_matches_clip_statistics():
    u8 = np.full((1, 2, 40, 40, 3), 255, np.uint8)
    f = np.ones((1, 2, 40, 40, 3), np.float32)
    assert np.allclose(normalize_patches(u8), normalize_patches(f))
    assert np.allclose(normalize_patches(u8)[0, 0, 0, 0], (1 - np.array([0.48145466, 0.4578275, 0.40821073]))
                       / np.array([0.26862954, 0.26130258, 0.27577711]), atol=1e-6)


def test_bad_frames_are_clear_errors():
    with pytest.raises(ValueError, match="frames must be"):
        frames_to_patches(np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(ValueError, match="empty"):
        frames_to_patches(np.zeros((0, 40, 40, 3)))

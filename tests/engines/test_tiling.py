"""Tile planning and blending, as properties over many image sizes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from modal_services.engines.sdxl.tiling import (
    ALIGN,
    MAX_TILE,
    MIN_OVERLAP,
    TILE_MULTIPLE,
    TileBlender,
    pad_to_plan,
    plan_axis,
    plan_tiles,
)

LENGTHS = [1, 7, 64, 500, 1024, 1152, 1153, 1500, 2048, 2049, 3000, 4096, 5000] + random.Random(5).sample(
    range(1, 6000), 40
)


@pytest.mark.parametrize("length", LENGTHS)
def test_axis_tiles_cover_the_length_with_the_minimum_overlap(length):
    axis = plan_axis(length)
    assert axis.covered >= length
    assert axis.tile % TILE_MULTIPLE == 0 and axis.tile <= max(MAX_TILE, axis.covered)
    assert all(start % ALIGN == 0 for start in axis.starts)
    assert axis.starts[0] == 0 and axis.starts[-1] + axis.tile == axis.covered
    covered = np.zeros(axis.covered, dtype=int)
    for start in axis.starts:
        covered[start : start + axis.tile] += 1
    assert covered.min() >= 1
    assert all(overlap >= MIN_OVERLAP for overlap in axis.overlaps())
    if axis.covered > MAX_TILE:
        assert axis.tile <= MAX_TILE


def test_tile_count_is_chosen_first_and_tiles_stretch_to_fit():
    # 2048 px: two tiles of 1088, not three of 1024 (the fixed-tile waste the notes warn about).
    axis = plan_axis(2048)
    assert (len(axis.starts), axis.tile) == (2, 1088)
    axis = plan_axis(4096)
    assert (len(axis.starts), axis.tile) == (4, 1088)


@pytest.mark.parametrize("output", [2048, 4096])
def test_denoised_area_is_within_the_goal(output):
    plan = plan_tiles(output, output)
    assert plan.area_ratio <= 1.2


SIZES = [(64, 64), (300, 200), (1024, 1024), (1500, 700), (2048, 1536), (2500, 2500)]


def _random_plan(width, height):
    # Small tiles keep the arrays small while exercising many-tile layouts.
    return plan_tiles(width, height, max_tile=256, min_overlap=32, multiple=64, align=8)


@pytest.mark.parametrize("width,height", SIZES)
def test_weights_sum_to_one_everywhere(width, height):
    plan = _random_plan(width, height)
    total = np.zeros((plan.covered_height, plan.covered_width))
    for tile, weight in zip(plan.tiles, plan.weights()):
        assert weight.shape == (tile.height, tile.width) and weight.min() > 0
        rows, columns = tile.slices
        total[rows, columns] += weight
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("width,height", SIZES)
def test_identity_tile_processor_reproduces_the_input(width, height):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    plan = _random_plan(width, height)
    padded = pad_to_plan(image, plan).astype(np.float32)
    blender = TileBlender(plan, channels=3)
    for tile in plan.tiles:
        rows, columns = tile.slices
        blender.add(tile, padded[rows, columns])
    result = blender.result()
    assert result.shape == image.shape
    assert np.abs(result - image).max() < 1e-3
    np.testing.assert_array_equal(np.rint(result).astype(np.uint8), image)


@pytest.mark.parametrize("width,height", SIZES)
def test_per_tile_brightness_shifts_leave_no_step_at_the_borders(width, height):
    rng = np.random.default_rng(1)
    image = np.full((height, width, 1), 100.0, dtype=np.float32)
    plan = _random_plan(width, height)
    shifts = rng.uniform(-20, 20, size=len(plan))
    padded = pad_to_plan(image, plan)
    blender = TileBlender(plan, channels=1)
    for tile in plan.tiles:
        rows, columns = tile.slices
        blender.add(tile, padded[rows, columns] + shifts[tile.index])
    result = blender.result()[:, :, 0].astype(np.float64)
    spread = shifts.max() - shifts.min() if len(plan) > 1 else 0.0
    steps = max(
        np.abs(np.diff(result, axis=0)).max(initial=0.0),
        np.abs(np.diff(result, axis=1)).max(initial=0.0),
    )
    # No step larger than the shifts' spread (a hard seam would be exactly that)...
    assert steps <= spread + 1e-3
    # ...and in fact a smooth ramp: the sin² feather's slope is at most pi/2 per overlap.
    assert steps <= spread * np.pi / (2 * 32) + 1e-3
    # The result stays within the range of the shifted tiles.
    assert result.min() >= 100 + shifts.min() - 1e-3 and result.max() <= 100 + shifts.max() + 1e-3


def test_latent_plan_is_the_pixel_plan_scaled():
    plan = plan_tiles(4096, 3000)
    latent = plan.scaled(8)
    for pixel_tile, latent_tile in zip(plan.tiles, latent.tiles):
        assert (latent_tile.x * 8, latent_tile.y * 8, latent_tile.width * 8, latent_tile.height * 8) == (
            pixel_tile.x, pixel_tile.y, pixel_tile.width, pixel_tile.height,
        )
    assert latent.covered_width * 8 == plan.covered_width


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        plan_axis(0)
    with pytest.raises(ValueError):
        plan_axis(100, max_tile=1000)
    with pytest.raises(ValueError):
        plan_axis(100, min_overlap=0)


@pytest.mark.parametrize("width,height,scale", [(80, 96, 2.0), (1024, 1024, 4.0), (1000, 700, 1.5), (33, 17, 3.0)])
def test_source_boxes_cover_the_source(width, height, scale):
    from modal_services.engines.sdxl.tiling import source_boxes

    plan = plan_tiles(round(width * scale), round(height * scale))
    boxes = source_boxes(plan, width, height)
    assert len(boxes) == len(plan)
    covered = np.zeros((height, width), dtype=bool)
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        covered[top:bottom, left:right] = True
    assert covered.all()


def test_planning_needs_no_numpy():
    import subprocess
    import sys

    code = ("import sys; sys.modules['numpy'] = None\n"
            "from modal_services.engines.sdxl.tiling import plan_tiles, source_boxes\n"
            "print(len(source_boxes(plan_tiles(4096, 2048), 1024, 512)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8"

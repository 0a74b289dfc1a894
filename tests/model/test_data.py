"""Synthetic shapes are deterministic and their masks exact; folder datasets fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model.data import CLASS_NAMES, DatasetError, FolderDataset, SyntheticShapes, synthetic_sample


def test_same_seed_same_sample_any_order():
    a, b = synthetic_sample(0, 5), synthetic_sample(0, 5)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.shapes == b.shapes
    assert not np.array_equal(synthetic_sample(0, 6).image, a.image)
    assert not np.array_equal(synthetic_sample(1, 5).image, a.image)
    ds = SyntheticShapes(10, seed=0)
    image, mask = ds[5]
    np.testing.assert_array_equal(image.numpy(), a.image)
    assert image.shape == (256, 256, 3) and mask.shape == (256, 256) and len(ds) == 10


def test_class_names():
    assert CLASS_NAMES == ("background", "circle", "rectangle", "triangle")


@pytest.mark.parametrize("index", range(12))
def test_every_clear_pixel_has_the_class_of_the_shape_drawn_there(index):
    """Against the geometry: away from edges (1.5 px), a pixel's class is that of the
    last shape containing it, or background when none does."""
    sample = synthetic_sample(3, index)
    assert 1 <= len(sample.shapes) <= 6
    h, w = sample.mask.shape
    offsets = [(0, 0), (1.5, 0), (-1.5, 0), (0, 1.5), (0, -1.5)]
    checked = 0
    for y in range(2, h - 2, 5):
        for x in range(2, w - 2, 5):
            owners = []
            for dx, dy in offsets:
                cx, cy = x + 0.5 + dx, y + 0.5 + dy  # pixel centre
                inside = [s.class_id for s in sample.shapes if s.contains(cx, cy)]
                owners.append(inside[-1] if inside else 0)
                # a pixel near a later shape's edge is ambiguous: skip it
            if len(set(owners)) == 1:
                assert sample.mask[y, x] == owners[0], (x, y)
                checked += 1
    assert checked > 2000
    assert sample.mask.max() <= 3 and sample.image.dtype == np.uint8


def test_shape_sizes_and_classes_vary():
    shapes = [s for i in range(40) for s in synthetic_sample(0, i).shapes]
    assert {s.class_id for s in shapes} == {1, 2, 3}
    radii = [max(s.ellipse[2], s.ellipse[3]) for s in shapes if s.class_id == 1]
    assert min(radii) < 15 and max(radii) > 40


def _folder(tmp_path, n=4, size=(32, 24)):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"s{i}.png"
        )
        Image.fromarray(rng.integers(0, 4, size, dtype=np.uint8)).save(tmp_path / "masks" / f"s{i}.png")
    return tmp_path


def test_folder_dataset_reads_pairs_and_palette_masks(tmp_path):
    root = _folder(tmp_path)
    palette_mask = Image.fromarray(np.full((32, 24), 2, np.uint8), "P")
    palette_mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    palette_mask.save(root / "masks" / "s0.png")
    Image.open(root / "images" / "s1.png").convert("RGB").save(root / "images" / "s1.jpg")
    (root / "images" / "s1.png").unlink()
    ds = FolderDataset(root, num_classes=4, size=(16, 16))
    assert len(ds) == 4
    image, mask = ds[0]
    assert image.shape == (16, 16, 3) and mask.shape == (16, 16) and int(mask.max()) == 2


def test_folder_missing_mask(tmp_path):
    root = _folder(tmp_path)
    (root / "masks" / "s2.png").unlink()
    with pytest.raises(DatasetError, match=r"s2\.png.*missing mask"):
        FolderDataset(root, 4)


def test_folder_size_mismatch(tmp_path):
    root = _folder(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "s1.png")
    with pytest.raises(DatasetError, match=r"s1\.png.*10x10"):
        FolderDataset(root, 4)


def test_folder_class_id_out_of_range(tmp_path):
    root = _folder(tmp_path)
    Image.fromarray(np.full((32, 24), 7, np.uint8)).save(root / "masks" / "s3.png")
    with pytest.raises(DatasetError, match=r"s3\.png.*class id 7"):
        FolderDataset(root, 4)


def test_folder_without_images(tmp_path):
    with pytest.raises(DatasetError, match="images"):
        FolderDataset(tmp_path, 4)

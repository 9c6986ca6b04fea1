import numpy as np
import pytest

from MSInstanceSaliencyLib.segmentation.instances import TABLE_COLUMNS, label_instances, lesion_table, read_table, write_table
from MSInstanceSaliencyLib.io.volumes import image_from_array

from conftest import make_image
from test_outputs import assert_failed_rewrite_keeps_the_file


def _blocks():
    m = np.zeros((12, 12, 12), bool)
    m[1:4, 1:4, 1:4] = True  # 27 voxels
    m[4, 4, 1:4] = True  # touches the cube only along an edge (18-connected)
    m[8:10, 8:10, 8:10] = True  # 8 voxels
    m[10, 10, 10] = True  # touches the 8-voxel cube only at a corner (26-connected)
    return m


def test_18_versus_26_connectivity():
    m = _blocks()
    l18 = label_instances(m, min_volume_mm3=0, connectivity=18)
    l26 = label_instances(m, min_volume_mm3=0, connectivity=26)
    l6 = label_instances(m, min_volume_mm3=0, connectivity=6)
    assert l18.max() == 3  # edge joins, corner does not
    assert l26.max() == 2
    assert l6.max() == 4
    assert l18[4, 4, 2] == l18[2, 2, 2]
    assert l18[10, 10, 10] != l18[9, 9, 9]


def test_minimum_volume_uses_spacing():
    m = np.zeros((10, 10, 10), bool)
    m[0:2, 0:2, 0:1] = True  # 4 voxels
    m[5:8, 5:7, 5:6] = True  # 6 voxels
    # 1 mm isotropic: 4 and 6 mm^3; drop <= 5 mm^3
    assert label_instances(m, spacing=(1, 1, 1), min_volume_mm3=5).max() == 1
    # anisotropic 0.5 x 0.5 x 3 mm = 0.75 mm^3/voxel: 3 and 4.5 mm^3 -> both dropped
    assert label_instances(m, spacing=(0.5, 0.5, 3.0), min_volume_mm3=5).max() == 0
    # 1 x 1 x 2 mm: 8 and 12 mm^3 -> both kept, numbered 1..2
    lab = label_instances(m, spacing=(1, 1, 2.0), min_volume_mm3=5)
    assert sorted(np.unique(lab)) == [0, 1, 2]
    # exactly 5 voxels at 1 mm^3 is dropped, as in the authors' scripts
    five = np.zeros((6, 6, 6), bool)
    five[0, 0, 0:5] = True
    assert label_instances(five, min_volume_mm3=5).max() == 0


def test_table_values_and_ras(tmp_path):
    img = make_image(shape=(12, 12, 12))
    m = np.zeros((12, 12, 12), bool)
    m[2:5, 3:6, 4:7] = True
    labels = label_instances(m, spacing=img.GetSpacing(), min_volume_mm3=0)
    prob = np.where(m, 0.8, 0.1).astype(np.float32)
    prob[3, 4, 5] = 0.95
    rows = lesion_table(labels, img, prob)
    assert len(rows) == 1
    r = rows[0]
    assert r["voxels"] == 27
    assert r["volume_mm3"] == pytest.approx(27 * np.prod(img.GetSpacing()), rel=1e-4)
    assert (r["centroid_i"], r["centroid_j"], r["centroid_k"]) == (3.0, 4.0, 5.0)
    lps = img.TransformContinuousIndexToPhysicalPoint((3.0, 4.0, 5.0))
    assert (r["centroid_r"], r["centroid_a"], r["centroid_s"]) == pytest.approx((-lps[0], -lps[1], lps[2]), abs=0.01)
    assert (r["bbox_i_min"], r["bbox_i_max"], r["bbox_k_min"], r["bbox_k_max"]) == (2, 4, 4, 6)
    assert r["max_probability"] == pytest.approx(0.95)
    assert r["mean_probability"] == pytest.approx((26 * 0.8 + 0.95) / 27, abs=1e-4)
    path = write_table(rows, tmp_path / "lesions.csv")
    back = read_table(path)
    assert list(back[0].keys()) == TABLE_COLUMNS
    assert back[0]["tp_probability"] == ""


def test_empty_map_gives_empty_table():
    img = image_from_array(np.zeros((5, 5, 5), np.float32))
    labels = label_instances(np.zeros((5, 5, 5), bool))
    assert labels.max() == 0
    assert lesion_table(labels, img) == []


def test_a_failed_table_write_keeps_the_earlier_table(tmp_path):
    lab = np.zeros((10, 10, 10), np.int32)
    lab[2:4, 2:4, 2:4] = 1
    rows = lesion_table(lab, image_from_array(lab.astype(np.float32)))
    path = write_table(rows, tmp_path / "lesions.csv")
    assert_failed_rewrite_keeps_the_file(path, lambda: write_table(rows * 50, path), n_bytes=path.stat().st_size + 100)
    assert len(read_table(path)) == 1

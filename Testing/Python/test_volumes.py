import numpy as np
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.io.volumes import array_from_image, image_from_array, overlap_fraction, read_image, same_grid, write_image

from conftest import make_image
from test_outputs import assert_failed_rewrite_keeps_the_file


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_geometry_round_trip_oblique_anisotropic(tmp_path, suffix):
    img = make_image()
    path = write_image(img, tmp_path / f"vol{suffix}")
    back = read_image(path)
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(array_from_image(back), array_from_image(img))


def test_array_axes_are_xyz():
    img = make_image(shape=(3, 4, 5))
    a = array_from_image(img)
    assert a.shape == (3, 4, 5)
    assert a[2, 1, 4] == img.GetPixel(2, 1, 4)
    again = image_from_array(a, reference=img)
    assert same_grid(again, img)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz", "FLAIR")
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read FLAIR"):
        read_image(bad, "FLAIR")


def test_2d_and_vector_images_rejected(tmp_path):
    flat = sitk.GetImageFromArray(np.ones((10, 12), np.float32))
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="3D volume is needed"):
        read_image(tmp_path / "flat.nii.gz")
    vec = sitk.GetImageFromArray(np.ones((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.nrrd"))
    with pytest.raises(InputError, match="components per voxel"):
        read_image(tmp_path / "vec.nrrd")


def test_overlap_fraction():
    a = make_image(direction=np.eye(3).ravel(), spacing=(1, 1, 1), origin=(0, 0, 0))
    b = make_image(direction=np.eye(3).ravel(), spacing=(1, 1, 1), origin=(500, 0, 0))
    assert overlap_fraction(a, a) == pytest.approx(1.0)
    assert overlap_fraction(b, a) == 0.0


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_a_failed_image_write_keeps_the_earlier_image(tmp_path, suffix):
    """SimpleITK returns normally after writing part of an image on a full disk: write_image checks the
    file before it takes the name, so the earlier image stays whole."""
    small, large = make_image((6, 7, 8)), make_image((60, 70, 80), seed=1)
    path = write_image(small, tmp_path / f"map{suffix}")
    assert_failed_rewrite_keeps_the_file(path, lambda: write_image(large, path), n_bytes=20_000)
    assert array_from_image(read_image(path)).shape == (6, 7, 8)


def _write_dicom_series(image, folder, series_uid):
    """One file per slice with the tags that place it (position, orientation, spacing), as scanners write them."""
    import locale

    folder.mkdir(parents=True, exist_ok=True)
    ctype = locale.setlocale(locale.LC_CTYPE)  # GDCM's writer sets the C locale: later tests would read text as ASCII
    try:
        return _write_slices(sitk.Cast(sitk.RescaleIntensity(image, 0, 4000), sitk.sitkInt16), folder, series_uid)
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)


def _write_slices(image, folder, series_uid):
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        for tag, value in (("0020|000e", series_uid), ("0020|0037", orientation), ("0008|0060", "MR"),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1)), ("0018|0050", f"{image.GetSpacing()[2]:.6f}"),
                           ("0008|0018", f"{series_uid}.{k + 1}")):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-1]}_slice{k:03d}.dcm"))
        writer.Execute(s)
    return image


def test_a_dicom_series_folder_reads_as_the_volume_and_bad_folders_say_why(tmp_path):
    image = sitk.GaussianSource(sitk.sitkFloat32, (12, 10, 8), sigma=(3, 3, 3), mean=(6, 5, 4))
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((10.0, -20.0, 5.0))
    written = _write_dicom_series(image, tmp_path / "flair", "1.2.826.0.1.3680043.2.1125.1")
    read = read_image(tmp_path / "flair", "FLAIR")
    assert read.GetSize() == written.GetSize()
    np.testing.assert_allclose(read.GetSpacing(), written.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(read.GetOrigin(), written.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(written))

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="without a DICOM series"):
        read_image(tmp_path / "empty", "FLAIR")
    _write_dicom_series(image, tmp_path / "two", "1.2.826.0.1.3680043.2.1125.2")
    _write_dicom_series(image, tmp_path / "two", "1.2.826.0.1.3680043.2.1125.3")
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_image(tmp_path / "two", "MPRAGE")

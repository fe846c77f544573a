"""BU-3DFE reader: names, VRML parsing, orientation, texture lookup, landmarks, errors, index."""

from __future__ import annotations

import numpy as np
import pytest

from scan_fixtures import BU3DFE_BROKEN, RED, BUScan, write_bu3dfe_scan
from train.datasets.bu3dfe import LANDMARK_GROUPS, index_bu3dfe, load_bu3dfe, parse_bu3dfe_name, read_bnd
from train.datasets.scan import ScanError, ScanRecord


def _record(scan: BUScan) -> ScanRecord:
    """A record built by hand, so broken scans the index would skip can still be loaded."""
    return ScanRecord("bu3dfe", "F0001", "anger", 1, scan.wrl, scan.texture, scan.bnd, photo=scan.photo)


def _texel(mesh, uv: np.ndarray) -> tuple[int, ...]:
    height, width = mesh.texture.shape[:2]
    return tuple(int(c) for c in mesh.texture[int(uv[1] * height), int(uv[0] * width)])


@pytest.mark.parametrize("name, subject, expression, intensity, race", [
    ("F0001_AN01WH_F3D.wrl", "F0001", "anger", 1, "WH"),
    ("M0044_SU04AE_F3D.wrl", "M0044", "surprise", 4, "AE"),
    ("F0023_NE00BL_F3D.wrl", "F0023", "neutral", 0, "BL"),
    ("F0002_DI03LA_F3D.wrl", "F0002", "disgust", 3, "LA"),
])
def test_labels_come_from_the_file_name(name, subject, expression, intensity, race):
    labels = parse_bu3dfe_name(name)
    assert (labels.subject, labels.expression, labels.intensity, labels.race) == (subject, expression, intensity, race)


@pytest.mark.parametrize("name, reason", [
    ("F0001_XX01WH_F3D.wrl", "unknown expression"),
    ("F0001_AN05WH_F3D.wrl", "intensity"),
    ("F0001_AN00WH_F3D.wrl", "intensity"),
    ("F0001_NE02WH_F3D.wrl", "intensity"),
    ("F0001_AN01WH_RAW.wrl", "not a BU-3DFE name"),
    ("face.wrl", "not a BU-3DFE name"),
])
def test_bad_names_are_refused_with_the_reason(name, reason):
    with pytest.raises(ValueError, match=reason):
        parse_bu3dfe_name(name)


@pytest.mark.parametrize("clockwise", [False, True])
def test_mesh_counts_split_quads_and_faces_plus_z(tmp_path, clockwise):
    scan = write_bu3dfe_scan(tmp_path, clockwise=clockwise)
    mesh = load_bu3dfe(_record(scan))
    assert scan.quads > 0 and scan.triangles > 0  # the file really mixes both
    assert mesh.vertices.shape == scan.vertices.shape
    np.testing.assert_allclose(mesh.vertices, scan.vertices, atol=1e-5)
    assert len(mesh.triangles) == scan.expected_triangles
    assert mesh.triangles.dtype == np.int32 and mesh.uv.shape == (scan.expected_triangles, 3, 2)
    assert int(np.argmax(mesh.vertices[:, 2])) == scan.nose_index  # the nose tip is the max-z vertex
    v0, v1, v2 = (mesh.vertices[mesh.triangles[:, k]] for k in range(3))
    assert (np.cross(v1 - v0, v2 - v0)[:, 2] > 0).all()  # counter-clockwise seen from +z, even from a CW file


@pytest.mark.parametrize("clockwise", [False, True])
def test_uvs_follow_tex_coord_index_and_v_counts_from_the_top(tmp_path, clockwise):
    scan = write_bu3dfe_scan(tmp_path, clockwise=clockwise)
    mesh = load_bu3dfe(_record(scan))
    # Every corner carries its own vertex's texture coordinate, v turned to count from the top.
    np.testing.assert_allclose(mesh.uv, scan.vertex_uv[mesh.triangles], atol=1e-5)
    corner = np.argwhere(mesh.triangles == scan.red_vertex)[0]
    assert _texel(mesh, mesh.uv[corner[0], corner[1]]) == RED
    u, v = mesh.uv[corner[0], corner[1]]
    assert _texel(mesh, np.array([u, 1.0 - v])) != RED  # the file's own v would miss it


def test_texture_is_the_image_texture_file_not_the_f2d_photo(tmp_path):
    scan = write_bu3dfe_scan(tmp_path)
    mesh = load_bu3dfe(_record(scan))
    assert mesh.texture.shape == (*scan.texture_shape, 3) and mesh.texture.dtype == np.uint8
    assert mesh.source == str(scan.wrl)


def test_texture_url_is_looked_up_beside_the_mesh(tmp_path):
    scan = write_bu3dfe_scan(tmp_path)
    text = scan.wrl.read_text().replace('url "F0001_AN01WH_F3D.bmp"', r'url "C:\capture\F0001_AN01WH_F3D.bmp"')
    scan.wrl.write_text(text)
    assert load_bu3dfe(_record(scan)).texture.shape[:2] == scan.texture_shape


def test_landmarks_are_the_83_bnd_points_in_named_groups(tmp_path):
    scan = write_bu3dfe_scan(tmp_path)
    mesh = load_bu3dfe(_record(scan))
    assert list(mesh.landmarks) == list(LANDMARK_GROUPS)
    assert [len(mesh.landmarks[g]) for g in LANDMARK_GROUPS] == [16, 20, 12, 20, 15]
    np.testing.assert_allclose(np.concatenate(list(mesh.landmarks.values())), scan.landmarks, atol=1e-5)
    np.testing.assert_allclose(read_bnd(scan.bnd), scan.landmarks, atol=1e-5)


def test_mesh_without_bnd_has_no_landmarks(tmp_path):
    scan = write_bu3dfe_scan(tmp_path)
    scan.bnd.unlink()
    record = index_bu3dfe(tmp_path).records[0]
    assert record.landmarks is None and load_bu3dfe(record).landmarks is None


@pytest.mark.parametrize("broken, reason, culprit", [
    ("truncated", "truncated", "wrl"),
    ("bad_header", "bad header", "wrl"),
    ("index_out_of_range", "index out of range", "wrl"),
    ("nan", "NaN/inf", "wrl"),
    ("empty", "empty mesh", "wrl"),
    ("missing_texture", "missing texture", "texture"),
    ("unreadable_texture", "unreadable image", "texture"),
    ("bad_landmarks", "83", "bnd"),
])
def test_broken_files_raise_one_line_scan_error_naming_the_file(tmp_path, broken, reason, culprit):
    assert broken in BU3DFE_BROKEN
    scan = write_bu3dfe_scan(tmp_path, broken=broken)
    with pytest.raises(ScanError, match=reason) as err:
        load_bu3dfe(_record(scan))
    message = str(err.value)
    assert message.startswith(f"{getattr(scan, culprit)}: ") and "\n" not in message


def test_missing_mesh_file_is_a_scan_error(tmp_path):
    scan = write_bu3dfe_scan(tmp_path)
    scan.wrl.unlink()
    with pytest.raises(ScanError, match="missing file"):
        load_bu3dfe(_record(scan))


def test_bad_number_and_mismatched_tex_index_are_scan_errors(tmp_path):
    scan = write_bu3dfe_scan(tmp_path)
    good = scan.wrl.read_text()
    scan.wrl.write_text(good.replace("coordIndex [\n", "coordIndex [\n0, x, 2, -1,\n", 1))
    with pytest.raises(ScanError, match="bad number in coordIndex"):
        load_bu3dfe(_record(scan))
    head, tail = good.split("texCoordIndex [\n")
    scan.wrl.write_text(head + "texCoordIndex [\n0, 1, 2, 3, 4, -1,\n" + tail)
    with pytest.raises(ScanError, match="texCoordIndex does not match"):
        load_bu3dfe(_record(scan))


def test_index_walks_subject_folders_and_lists_what_it_skipped(tmp_path):
    write_bu3dfe_scan(tmp_path / "F0001", "F0001_AN03WH")
    write_bu3dfe_scan(tmp_path / "F0001", "F0001_NE00WH")
    write_bu3dfe_scan(tmp_path / "F0001", "F0001_AN01WH")
    write_bu3dfe_scan(tmp_path / "M0002", "M0002_HA04BL")
    write_bu3dfe_scan(tmp_path / "M0002", "M0002_SA02BL", broken="missing_texture")
    write_bu3dfe_scan(tmp_path / "M0002", "M0002_XX02BL")
    (tmp_path / "F0001" / "F0001_AN03WH_RAW.wrl").write_text("#VRML V2.0 utf8\n")
    (tmp_path / "notes.txt").write_text("not a scan")

    result = index_bu3dfe(tmp_path)
    assert [(r.subject, r.expression, r.intensity) for r in result.records] == [
        ("F0001", "neutral", 0), ("F0001", "anger", 1), ("F0001", "anger", 3), ("M0002", "happiness", 4),
    ]
    first = result.records[0]
    assert first.dataset == "bu3dfe" and first.texture.name == "F0001_NE00WH_F3D.bmp"
    assert first.landmarks.name == "F0001_NE00WH_F3D.bnd" and first.photo.name == "F0001_NE00WH_F2D.bmp"
    reasons = {path.name: reason for path, reason in result.skipped}
    assert reasons.keys() == {"M0002_SA02BL_F3D.wrl", "M0002_XX02BL_F3D.wrl"}
    assert "missing texture" in reasons["M0002_SA02BL_F3D.wrl"]
    assert "unknown expression" in reasons["M0002_XX02BL_F3D.wrl"]
    assert result.ignored == {"raw_mesh": 1}
    summary = result.summary()
    assert "4 samples of 2 subjects" in summary and "skipped 2" in summary and "raw_mesh 1" in summary
    assert "\n" not in summary


def test_a_dataset_pass_survives_bad_files(tmp_path):
    for i, broken in enumerate((None, "truncated", "nan", None, "unreadable_texture")):
        write_bu3dfe_scan(tmp_path / "F0003", f"F0003_HA0{i % 4 + 1}WH" if i < 4 else "F0003_SU01WH", broken=broken)
    loaded, failed = [], []
    for record in index_bu3dfe(tmp_path).records:
        try:
            loaded.append(load_bu3dfe(record))
        except ScanError as err:
            failed.append(err.path.name)
    assert len(loaded) == 2
    assert sorted(failed) == ["F0003_HA02WH_F3D.wrl", "F0003_HA03WH_F3D.wrl", "F0003_SU01WH_F3D.bmp"]


def test_missing_root_is_a_scan_error(tmp_path):
    with pytest.raises(ScanError, match="not a folder"):
        index_bu3dfe(tmp_path / "nowhere")

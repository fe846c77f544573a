"""Bosphorus reader: names, .bnt grid (bottom-up rows, invalid points), triangulation, axes, texture, landmarks."""

from __future__ import annotations

import numpy as np
import pytest

from scan_fixtures import BOSPHORUS_BROKEN, RED, BosphorusScan, write_bosphorus_scan
from train.datasets.bosphorus import (
    MAX_DEPTH_JUMP_MM,
    index_bosphorus,
    load_bosphorus,
    parse_bosphorus_name,
    read_bnt,
    read_lm2,
    read_lm3,
)
from train.datasets.scan import ScanError, ScanRecord


def _record(scan: BosphorusScan) -> ScanRecord:
    return ScanRecord("bosphorus", "bs000", "happiness", None, scan.bnt, scan.png, scan.lm3, scan.lm2)


def _vertex_of_cell(scan: BosphorusScan, cell: tuple[int, int]) -> int:
    """Vertex number of a valid grid cell: valid cells numbered top-down, row-major."""
    return int(np.cumsum(scan.valid.ravel())[np.ravel_multi_index(cell, scan.valid.shape)] - 1)


@pytest.mark.parametrize("stem, subject, expression, category, take", [
    ("bs000_E_HAPPY_0", "bs000", "happiness", "E", 0),
    ("bs017_E_SADNESS_0", "bs017", "sadness", "E", 0),
    ("bs104_N_N_2", "bs104", "neutral", "N", 2),
    ("bs000_LFAU_9_0", "bs000", None, "LFAU", 0),
    ("bs000_CAU_A22A25_0", "bs000", None, "CAU", 0),
    ("bs000_YR_R10_0", "bs000", None, "YR", 0),
    ("bs000_CR_RD_0", "bs000", None, "CR", 0),
    ("bs000_O_EYE_0", "bs000", None, "O", 0),
])
def test_labels_come_from_the_file_stem(stem, subject, expression, category, take):
    name = parse_bosphorus_name(stem)
    assert (name.subject, name.expression, name.category, name.take) == (subject, expression, category, take)


@pytest.mark.parametrize("stem, reason", [
    ("bs000_E_CONTEMPT_0", "unknown expression"),
    ("bs000_N_HAPPY_0", "unknown expression"),
    ("bs000_XX_1_0", "unknown file category"),
    ("bs0_E_HAPPY_0", "not a Bosphorus name"),
    ("scan", "not a Bosphorus name"),
])
def test_bad_stems_are_refused_with_the_reason(stem, reason):
    with pytest.raises(ValueError, match=reason):
        parse_bosphorus_name(stem)


def test_bnt_rows_are_stored_bottom_up_and_zmin_marks_invalid_points(tmp_path):
    scan = write_bosphorus_scan(tmp_path)
    grid = read_bnt(scan.bnt)
    np.testing.assert_array_equal(grid.valid, scan.valid)  # top-down, like the written grid
    assert not grid.valid[scan.hole]
    np.testing.assert_allclose(grid.xyz[scan.valid], scan.xyz[scan.valid])
    np.testing.assert_allclose(grid.uv[scan.valid], scan.uv[scan.valid])
    assert grid.image_name == "bs000_E_HAPPY_0.png" and grid.zmin == -1e9


def test_mesh_vertices_are_the_valid_points_and_face_plus_z(tmp_path):
    scan = write_bosphorus_scan(tmp_path)
    mesh = load_bosphorus(_record(scan))
    assert len(mesh.vertices) == scan.valid.sum()
    nose = _vertex_of_cell(scan, scan.nose)
    assert int(np.argmax(mesh.vertices[:, 2])) == nose  # the nose tip is the max-z vertex
    np.testing.assert_allclose(mesh.vertices[nose], scan.xyz[scan.nose], atol=1e-5)
    top, bottom = _vertex_of_cell(scan, (2, 8)), _vertex_of_cell(scan, (17, 8))
    assert mesh.vertices[top, 1] > mesh.vertices[bottom, 1]  # +y up
    left, right = _vertex_of_cell(scan, (10, 2)), _vertex_of_cell(scan, (10, 13))
    assert mesh.vertices[right, 0] > mesh.vertices[left, 0]  # +x toward the image right (subject's left)
    v0, v1, v2 = (mesh.vertices[mesh.triangles[:, k]] for k in range(3))
    assert (np.cross(v1 - v0, v2 - v0)[:, 2] > 0).all()


def _reference_triangles(scan: BosphorusScan) -> set[tuple[int, ...]]:
    """Cell by cell: two triangles for 4 valid corners, one for 3, none across a depth jump."""
    rows, cols = scan.valid.shape
    found = set()
    for r in range(rows - 1):
        for c in range(cols - 1):
            corners = [(r, c), (r + 1, c), (r + 1, c + 1), (r, c + 1)]  # tl, bl, br, tr
            ok = [bool(scan.valid[p]) for p in corners]
            if sum(ok) == 4:
                tris = [(corners[0], corners[1], corners[2]), (corners[0], corners[2], corners[3])]
            elif sum(ok) == 3:
                tris = [tuple(p for p, good in zip(corners, ok) if good)]
            else:
                tris = []
            for tri in tris:
                depth = [scan.xyz[p][2] for p in tri]
                if max(depth) - min(depth) <= MAX_DEPTH_JUMP_MM:
                    found.add(tuple(sorted(_vertex_of_cell(scan, p) for p in tri)))
    return found


def test_triangles_cover_valid_cells_and_skip_depth_jumps(tmp_path):
    scan = write_bosphorus_scan(tmp_path)
    mesh = load_bosphorus(_record(scan))
    assert {tuple(sorted(t)) for t in mesh.triangles.tolist()} == _reference_triangles(scan)
    assert len(mesh.triangles) == len(_reference_triangles(scan))
    spike = _vertex_of_cell(scan, scan.spike)
    assert spike not in mesh.triangles  # the point 40 mm behind its neighbours joins no triangle
    beside_hole = _vertex_of_cell(scan, (scan.hole[0], scan.hole[1] + 1))
    assert beside_hole in mesh.triangles  # 3-valid cells around the hole still give triangles


def test_uvs_index_the_png_with_v_from_the_top(tmp_path):
    scan = write_bosphorus_scan(tmp_path)
    mesh = load_bosphorus(_record(scan))
    height, width = scan.texture_shape
    assert mesh.texture.shape == (height, width, 3)
    nose = _vertex_of_cell(scan, scan.nose)
    tri, corner = np.argwhere(mesh.triangles == nose)[0]
    u, v = mesh.uv[tri, corner]
    assert tuple(mesh.texture[int(v * height), int(u * width)]) == RED
    assert tuple(mesh.texture[int((1 - v) * height), int(u * width)]) != RED
    # The same check real files pass: a 3D landmark's cell maps onto its 2D landmark.
    np.testing.assert_allclose(read_lm2(scan.lm2)["nose_tip"], (u * width, v * height), atol=1.0)


def test_landmarks_are_named_and_in_the_mesh_frame(tmp_path):
    scan = write_bosphorus_scan(tmp_path)
    mesh = load_bosphorus(_record(scan))
    assert set(mesh.landmarks) == {"outer_left_eyebrow", "nose_tip", "left_mouth_corner", "chin_middle"}
    np.testing.assert_allclose(mesh.landmarks["nose_tip"], mesh.vertices[_vertex_of_cell(scan, scan.nose)], atol=1e-4)
    assert mesh.landmarks["outer_left_eyebrow"][0] > 0 > mesh.landmarks["chin_middle"][1]
    lm2 = read_lm2(scan.lm2)
    assert set(lm2) == set(mesh.landmarks)
    for label, xy in scan.landmarks_2d.items():
        np.testing.assert_allclose(lm2[label.lower().replace(" ", "_")], xy, atol=1e-5)


@pytest.mark.parametrize("signs", [(1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)])
def test_files_with_other_axis_directions_are_converted(tmp_path, signs):
    reference = load_bosphorus(_record(write_bosphorus_scan(tmp_path / "ref")))
    flipped = load_bosphorus(_record(write_bosphorus_scan(tmp_path / "flip", file_axis_signs=signs)))
    np.testing.assert_allclose(flipped.vertices, reference.vertices, atol=1e-5)
    np.testing.assert_allclose(flipped.landmarks["nose_tip"], reference.landmarks["nose_tip"], atol=1e-5)
    v0, v1, v2 = (flipped.vertices[flipped.triangles[:, k]] for k in range(3))
    assert (np.cross(v1 - v0, v2 - v0)[:, 2] > 0).all()


@pytest.mark.parametrize("broken, reason, culprit", [
    ("truncated", "truncated", "bnt"),
    ("bad_header", "bad header", "bnt"),
    ("nan", "NaN/inf", "bnt"),
    ("empty", "empty mesh", "bnt"),
    ("missing_texture", "missing texture", "png"),
    ("unreadable_texture", "unreadable image", "png"),
    ("bad_landmarks", "truncated: header says 4 landmarks, file has 3", "lm3"),
])
def test_broken_files_raise_one_line_scan_error_naming_the_file(tmp_path, broken, reason, culprit):
    assert broken in BOSPHORUS_BROKEN
    scan = write_bosphorus_scan(tmp_path, broken=broken)
    with pytest.raises(ScanError, match=reason) as err:
        load_bosphorus(_record(scan))
    message = str(err.value)
    assert message.startswith(f"{getattr(scan, culprit)}: ") and "\n" not in message


def test_missing_and_tiny_bnt_files_are_scan_errors(tmp_path):
    scan = write_bosphorus_scan(tmp_path)
    scan.bnt.write_bytes(b"\x01\x00")
    with pytest.raises(ScanError, match="truncated"):
        read_bnt(scan.bnt)
    scan.bnt.unlink()
    with pytest.raises(ScanError, match="missing file"):
        load_bosphorus(_record(scan))


def test_landmark_files_parse_and_bad_ones_are_scan_errors(tmp_path):
    scan = write_bosphorus_scan(tmp_path)
    lm3 = read_lm3(scan.lm3)
    np.testing.assert_allclose(lm3["nose_tip"], scan.landmarks_3d["Nose tip"], atol=1e-5)
    scan.lm2.write_text("# LANDMARKS 2D\n\n4 landmarks:\n\nLabels:\nNose tip\n\n2D Image coordinates:\n1 2\n")
    with pytest.raises(ScanError, match="truncated"):
        read_lm2(scan.lm2)
    scan.lm3.write_text("# LANDMARKS 3D\n\n1 landmarks:\nNose tip\n1.0 two 3.0\n")
    with pytest.raises(ScanError, match="bad coordinates for 'Nose tip'"):
        read_lm3(scan.lm3)
    scan.lm3.write_text("no count line\n")
    with pytest.raises(ScanError, match="no 'N landmarks:' line"):
        read_lm3(scan.lm3)


def test_index_keeps_expressions_and_counts_the_rest(tmp_path):
    for stem in ("bs000_E_HAPPY_0", "bs000_E_ANGER_0", "bs000_N_N_0", "bs000_N_N_1", "bs000_LFAU_9_0",
                 "bs000_UFAU_2_0", "bs000_YR_R10_0", "bs000_CR_RD_0", "bs000_O_EYE_0"):
        write_bosphorus_scan(tmp_path / "bs000", stem, rows=6, cols=5)
    write_bosphorus_scan(tmp_path / "bs001", "bs001_E_SADNESS_0", rows=6, cols=5, broken="missing_texture")
    write_bosphorus_scan(tmp_path / "bs001", "bs001_E_CONTEMPT_0", rows=6, cols=5)
    write_bosphorus_scan(tmp_path / "bs001", "bs001_E_FEAR_0", rows=6, cols=5)
    (tmp_path / "bs001" / "bs001_E_FEAR_0.lm3").unlink()

    result = index_bosphorus(tmp_path)
    assert [(r.subject, r.expression, r.take) for r in result.records] == [
        ("bs000", "neutral", 0), ("bs000", "neutral", 1), ("bs000", "anger", 0), ("bs000", "happiness", 0),
        ("bs001", "fear", 0),
    ]
    assert all(r.intensity is None and r.dataset == "bosphorus" for r in result.records)
    assert result.records[-1].landmarks is None and result.records[-1].landmarks_2d.suffix == ".lm2"
    assert result.ignored == {"action_unit": 2, "pose": 2, "occlusion": 1}
    reasons = {path.name: reason for path, reason in result.skipped}
    assert reasons.keys() == {"bs001_E_SADNESS_0.bnt", "bs001_E_CONTEMPT_0.bnt"}
    assert "missing texture" in reasons["bs001_E_SADNESS_0.bnt"]
    summary = result.summary()
    assert "5 samples of 2 subjects" in summary and "action_unit 2" in summary and "\n" not in summary

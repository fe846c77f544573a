"""MediaPipe FaceMesh stage on a real photo, a rendered ICT head and blank images."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from calib.camera import D4XX_COLOR_640x480
from realtime.frames import RGBDFrame
from realtime.landmarks import NUM_LANDMARKS, LandmarkDetector, LandmarkOptions

ROOT = Path(__file__).resolve().parents[1]

PHOTO = Path(cv2.__file__).parents[1] / "matplotlib" / "mpl-data" / "sample_data" / "grace_hopper.jpg"


def frame_of(color: np.ndarray) -> RGBDFrame:
    h, w = color.shape[:2]
    return RGBDFrame(color=color, depth=np.zeros((h, w), np.uint16), depth_scale=0.001,
                     intrinsics=D4XX_COLOR_640x480.scaled(w, h))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    assert PHOTO.exists(), f"{PHOTO} is shipped with matplotlib"
    return cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)  # (600, 512, 3)


@pytest.fixture(scope="module")
def detector():
    with LandmarkDetector(LandmarkOptions(static_image_mode=True, max_faces=2)) as det:
        yield det


def test_real_photo_gives_468_points_inside_the_face(detector, photo):
    faces = detector.process(frame_of(photo))
    assert len(faces) == 1
    face = faces[0]
    assert face.points.shape == (NUM_LANDMARKS, 2) and face.points.dtype == np.float32
    assert face.track_id == -1
    x0, y0, x1, y1 = face.bbox
    assert np.allclose([x0, y0], face.points.min(0)) and np.allclose([x1, y1], face.points.max(0))
    assert 150 < x1 - x0 < 400 and 150 < y1 - y0 < 450
    # MediaPipe's "left" eye (263) is the subject's left: the image right of a photo
    assert face.points[263, 0] > face.points[4, 0] > face.points[33, 0]
    assert face.points[10, 1] < face.points[4, 1] < face.points[152, 1]  # forehead above nose above chin


def test_rendered_ict_head_is_found_where_the_renderer_put_it(detector):
    pytest.importorskip("open3d", reason="rendering needs open3d (train extra)")
    from train.face_model import FaceModel
    from train.render import RenderOptions, RenderPose, ScanRenderer

    model = FaceModel.load()
    rng = np.random.default_rng(3)
    mesh = model.mesh(model.random_identity(rng), None, model.procedural_texture(rng))
    with ScanRenderer(RenderOptions(seed=3)) as renderer:
        result = renderer.process(mesh, RenderPose(yaw=15, pitch=-5, distance_mm=650.0, offset_mm=(30.0, 10.0)))
    faces = detector.process(result.frame)
    assert len(faces) == 1
    truth = result.landmarks_px["multipie68"]  # ICT's own landmarks, projected
    pts = faces[0].points
    # same anatomical points in two conventions: a few pixels apart at most
    for mediapipe_index, multipie_index in ((4, 30), (33, 36), (263, 45), (61, 48), (291, 54)):
        assert np.linalg.norm(pts[mediapipe_index] - truth[multipie_index]) < 12, mediapipe_index


def test_blank_and_noise_images_give_no_face(detector):
    assert detector.process(frame_of(np.zeros((480, 640, 3), np.uint8))) == []
    noise = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    assert detector.process(frame_of(noise)) == []


def test_two_faces_come_largest_first(detector, photo):
    canvas = np.full((400, 640, 3), 90, np.uint8)
    canvas[24:376, 330:630] = cv2.resize(photo, (300, 352))
    canvas[100:330, 30:226] = cv2.resize(photo, (196, 230))
    faces = detector.process(frame_of(canvas))
    assert len(faces) == 2
    areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
    assert areas[0] > areas[1]
    assert faces[0].bbox[0] > 320 and faces[1].bbox[2] < 240


def test_tracking_mode_follows_a_stream(photo):
    with LandmarkDetector() as tracker:  # static_image_mode=False: the runtime's default
        first = tracker.process(frame_of(photo))
        shifted = np.roll(photo, 8, axis=1)
        second = tracker.process(frame_of(shifted))
    assert len(first) == len(second) == 1
    assert abs(float(np.median(second[0].points[:, 0] - first[0].points[:, 0])) - 8) < 2


def test_misuse_raises_clear_errors(photo):
    with pytest.raises(ValueError, match="max_faces"):
        LandmarkOptions(max_faces=0)
    with pytest.raises(ValueError, match="min_detection_confidence"):
        LandmarkOptions(min_detection_confidence=1.5)
    detector = LandmarkDetector()
    with pytest.raises(ValueError, match="uint8"):
        detector.process_image(photo.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detector.process_image(photo[..., 0])
    detector.close()
    detector.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        detector.process(frame_of(photo))


def test_held_back_stderr_keeps_everything_but_the_known_chatter(capfd):
    from realtime.native_log import quiet_native_stderr

    with quiet_native_stderr():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"W0000 00:00:1795628090.607927   27372 landmark_projection_calculator.cc:186] Using NORM_RECT\n")
        os.write(2, b"E0000 00:00:1795628090.607927   27372 something_else.cc:12] a real error\n")
        os.write(2, b"a line from anywhere else\n")
    err = capfd.readouterr().err
    assert err == ("E0000 00:00:1795628090.607927   27372 something_else.cc:12] a real error\n"
                   "a line from anywhere else\n")


def test_mediapipe_start_up_and_first_faces_print_nothing(tmp_path, photo):
    """A user's terminal shows no MediaPipe C++ chatter from a detector that finds a face."""
    np.save(tmp_path / "photo.npy", photo)
    code = ("import numpy as np; from realtime.landmarks import LandmarkDetector; "
            f"img = np.load({str(tmp_path / 'photo.npy')!r}); d = LandmarkDetector(); "
            "print(sum(len(d.process_image(img)) for _ in range(5)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5"  # the face was found (and tracked) on every frame
    assert result.stderr == ""

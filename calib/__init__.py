"""Camera models shared by the live path, the scan renderer and the tests."""

from calib.camera import CameraIntrinsics, CameraModel, Extrinsics, D4XX_COLOR_640x480

__all__ = ["CameraIntrinsics", "CameraModel", "Extrinsics", "D4XX_COLOR_640x480"]

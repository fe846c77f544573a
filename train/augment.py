"""Batch augmentation of canonical maps that keeps texture, geometry and masks consistent.

Every sample of a batch draws its own parameters from a ``torch.Generator`` (on the CPU, so the
draw is the same whatever device the batch lives on): same generator state, same result.

- Horizontal flip: mirrors every map, negates normal_x (x points the other way) and swaps the
  subject's left/right masks (a mirrored left eye is a right eye).
- In-plane rotation about the map centre and a shift (a random crop of a padded map), applied
  identically to all maps; the normals' (x, y) rotate with the image. There is no zoom: the maps
  are metric (mm per pixel is part of the preprocessing version), so scaling would lie about size.
- Depth noise on valid pixels (any geometry channel non-zero) and colour jitter (brightness,
  contrast, saturation) on the texture.

Canonical frame vs image: +x = +column, +y = -row (``realtime.spec``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from realtime.masks import flip_permutation
from realtime.spec import GEOMETRY_CHANNELS, MASK_NAMES, SPEC


@dataclass(frozen=True)
class AugmentOptions:
    """Augmentation strengths; a zero turns that augmentation off.

    Attributes:
        flip_p: Probability of a horizontal flip.
        max_rotation_deg: Rotation angle drawn uniformly in +-this.
        max_shift_px: Shift per axis drawn uniformly in +-this (pixels).
        depth_noise_mm: Standard deviation of Gaussian noise on the depth channel, in mm.
        brightness: Texture multiplied by a factor in 1 +- this.
        contrast: Texture blended with its mean grey by a factor in 1 +- this.
        saturation: Texture blended with its grey image by a factor in 1 +- this.
    """

    flip_p: float = 0.5
    max_rotation_deg: float = 10.0
    max_shift_px: float = 6.0
    depth_noise_mm: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


class Augmenter:
    """Applies :class:`AugmentOptions` to a batch dict {"texture", "geometry", "masks", ...}.

    Args:
        options: Strengths.
        geometry_channels: Names of the geometry channels, in order; a batch may carry only the
            first few (depth-only data), the rest are then skipped.
        mask_names: Names of the mask channels in the batch, in order.
        depth_scale_mm: Millimetres per unit of the depth channel.
    """

    def __init__(
        self,
        options: AugmentOptions = AugmentOptions(),
        geometry_channels: tuple[str, ...] = GEOMETRY_CHANNELS,
        mask_names: tuple[str, ...] = MASK_NAMES,
        depth_scale_mm: float = SPEC.depth_scale_mm,
    ) -> None:
        self.options = options
        self.channels = {name: i for i, name in enumerate(geometry_channels)}
        self.mask_perm = list(flip_permutation(mask_names))
        self.depth_scale_mm = depth_scale_mm
        # What the canonical maps hold off the face: depth at SPEC.depth_min_mm, normal +z.
        self.depth_floor = SPEC.depth_min_mm / depth_scale_mm
        background = {"depth": self.depth_floor, "normal_z": 1.0}
        self.geometry_background = torch.tensor([background.get(name, 0.0) for name in geometry_channels])

    def _channel(self, name: str, geometry: torch.Tensor) -> int | None:
        """Index of a named geometry channel if this batch carries it."""
        index = self.channels.get(name)
        return index if index is not None and index < geometry.shape[1] else None

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Returns a new batch dict (other keys, e.g. "label", pass through unchanged)."""
        opts = self.options
        texture, geometry, masks = batch["texture"], batch["geometry"], batch["masks"]  # (B, C, H, W) each
        n = texture.shape[0]

        def uniform(scale: float) -> torch.Tensor:  # (B,) in [-scale, scale], drawn on the CPU
            return ((torch.rand(n, generator=generator) * 2 - 1) * scale).to(texture.device)

        if opts.flip_p > 0:
            flip = (torch.rand(n, generator=generator) < opts.flip_p).to(texture.device)
            texture, geometry, masks = self.flip(texture, geometry, masks, flip)
        if opts.max_rotation_deg > 0 or opts.max_shift_px > 0:
            angle = uniform(math.radians(opts.max_rotation_deg))
            shift = torch.stack([uniform(opts.max_shift_px), uniform(opts.max_shift_px)], dim=1)  # (B, 2) px
            texture, geometry, masks = self.rotate_shift(texture, geometry, masks, angle, shift)
        if opts.depth_noise_mm > 0 and self._channel("depth", geometry) is not None:
            geometry = self.depth_noise(geometry, generator)
        if opts.brightness > 0 or opts.contrast > 0 or opts.saturation > 0:
            texture = self.color_jitter(texture, uniform(opts.brightness), uniform(opts.contrast),
                                        uniform(opts.saturation))
        return {**batch, "texture": texture, "geometry": geometry, "masks": masks}

    def flip(
        self, texture: torch.Tensor, geometry: torch.Tensor, masks: torch.Tensor, which: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mirror the samples where ``which`` (B,) is true."""
        sel = which.view(-1, 1, 1, 1)
        flipped_geometry = geometry.flip(-1)
        nx = self._channel("normal_x", geometry)
        if nx is not None:
            sign = torch.ones(geometry.shape[1], device=geometry.device)
            sign[nx] = -1.0
            flipped_geometry = flipped_geometry * sign.view(1, -1, 1, 1)
        return (
            torch.where(sel, texture.flip(-1), texture),
            torch.where(sel, flipped_geometry, geometry),
            torch.where(sel, masks.flip(-1)[:, self.mask_perm], masks),
        )

    def rotate_shift(
        self, texture: torch.Tensor, geometry: torch.Tensor, masks: torch.Tensor,
        angle: torch.Tensor, shift_px: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate the content by ``angle`` (B,) radians counter-clockwise as seen (canonical +x to
        +y) about the centre, then move it by ``shift_px`` (B, 2) (columns, rows)."""
        n, _, h, w = texture.shape
        cos, sin = torch.cos(angle), torch.sin(angle)
        # affine_grid maps output to input coordinates (u right, v down, in [-1, 1]); a CCW turn in
        # the y-up frame reads in the v-down frame as u_in = cos*u - sin*v, v_in = sin*u + cos*v.
        theta = torch.zeros(n, 2, 3, device=texture.device)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
        theta[:, 0, 2] = -shift_px[:, 0] * 2 / w
        theta[:, 1, 2] = -shift_px[:, 1] * 2 / h
        # Warp the geometry's offset from the off-face background, so what enters at the edges is
        # background (depth floor, normal +z) as the canonical stage writes it; texture and masks are 0 there.
        background = self.geometry_background[:geometry.shape[1]].to(geometry).view(1, -1, 1, 1)
        stacked = torch.cat([texture, geometry - background, masks], dim=1)  # (B, 3+G+K, H, W)
        grid = F.affine_grid(theta, list(stacked.shape), align_corners=False)
        warped = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        texture, geometry, masks = warped.split([texture.shape[1], geometry.shape[1], masks.shape[1]], dim=1)
        geometry = geometry + background
        ix, iy = self._channel("normal_x", geometry), self._channel("normal_y", geometry)
        if ix is not None and iy is not None:
            nx, ny = geometry[:, ix], geometry[:, iy]
            c, s = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
            geometry = geometry.clone()
            geometry[:, ix] = c * nx - s * ny
            geometry[:, iy] = s * nx + c * ny
        return texture, geometry, masks

    def depth_noise(self, geometry: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise on the depth channel on the face (not on the off-face background)."""
        d = self._channel("depth", geometry)
        valid = geometry[:, d] > self.depth_floor + 1e-6  # (B, H, W)
        noise = torch.randn(geometry[:, d].shape, generator=generator).to(geometry.device)
        geometry = geometry.clone()
        geometry[:, d] = geometry[:, d] + noise * (self.options.depth_noise_mm / self.depth_scale_mm) * valid
        return geometry

    @staticmethod
    def color_jitter(
        texture: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
    ) -> torch.Tensor:
        """Brightness, contrast and saturation offsets (each (B,), 0 = unchanged); result in [0, 1]."""
        def per_sample(v: torch.Tensor) -> torch.Tensor:
            return v.view(-1, 1, 1, 1)

        x = texture * (1 + per_sample(brightness))
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * (1 + per_sample(contrast))
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (B, 1, H, W)
        x = grey + (x - grey) * (1 + per_sample(saturation))
        return x.clamp(0.0, 1.0)

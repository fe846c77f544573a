"""Generate the built-in demo clip: held-out synthetic people making all seven expressions.

Usage:
    python -m train.make_demo_clip                                  # -> realtime/assets/demo_clip.npz
    python -m train.make_demo_clip --out /tmp/clip.npz --seed 3 --seconds 10 --fps 30 --people 1

What is in the clip (:mod:`realtime.demo_clip` format, 640x480 D4xx colour geometry, depth
aligned to colour, played at ``--fps``, its real rate; players loop it):

- ``--people`` ICT-FaceKit heads (:mod:`train.face_model`), one after the other. Each starts
  neutral, then makes the six basic expressions in a random order, each as
  neutral -> onset -> hold -> offset -> neutral (smoothstep ramps, a peak intensity of 0.8-1.0,
  blendshape jitter drawn once per expression so a hold does not flicker). After each person the
  scene is empty for ``gap_s`` (the demo shows ``no_face`` and a new track id).
- Smooth head motion per person: yaw/pitch/roll are sums of slow sinusoids scaled so that their
  extremes reach +-``max_yaw`` / ``max_pitch`` / ``max_roll``; face distance 500-800 mm and a
  sideways/vertical drift the same way. The head turns about the centre of its bounding box.
- Depth: the renderer's D4xx model (z^2 noise on the depth imager's grid, holes at depth edges,
  random dropouts). The background has no depth (a D4xx gives 0 beyond its range or on a
  textureless wall): a noisy wall would double the file for pixels the pipeline never reads.
- Colour: one fixed, slightly defocused room background for the whole clip (wall, window,
  picture, shelf), one fixed light per person, fresh sensor noise per frame.

Ground truth (the labels the benchmark scores): the active expression while its intensity is at
least ``label_threshold`` (0.6) of that expression's peak; ``"neutral"`` while no expression is
active (intensity 0); ``""`` (unlabelled) on the faint part of the ramps, where even a person
would hesitate between neutral and the expression, and on empty frames. Extras per frame:
``head_pose`` (yaw, pitch, roll in degrees as :class:`train.render.RenderPose`; nose tip x, y, z in
camera mm, like the published ``head_pose``), ``expression`` (the scripted expression,
``"neutral"`` at rest, ``""`` when empty), ``intensity`` (0..1) and ``person`` (-1 when empty).

Held-out identities: every random draw of person ``p`` comes from
``numpy.random.SeedSequence(seed, spawn_key=(DEMO_STREAM, p, part))`` with
``DEMO_STREAM = int.from_bytes(b"demo", "big")`` (part 0: expression order and motion; part 1:
identity, skin, light), the room and the sensor noise from the same with ``p = 2**31``. The
synthetic training set (``train.datasets.synthetic``) draws from ``default_rng([seed, ...])``
streams without a spawn key, so no demo person is a training identity, whatever the two seeds.
The clip is identical for a given seed and options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from realtime.demo_clip import DEFAULT_DEMO_CLIP, write_demo_clip
from realtime.frames import RGBDFrame
from realtime.spec import EXPRESSIONS
from train.face_model import FaceModel, expression_weights
from train.render import RenderOptions, RenderPose, ScanRenderer, random_light_direction

DEMO_STREAM = int.from_bytes(b"demo", "big")
"""First spawn key of every random stream of the demo clip (never used by training data)."""

NEUTRAL = EXPRESSIONS[0]
LIGHT_SPREAD_DEG = 35.0  # one light per person, within this of the camera axis
_BACKGROUND = 2**31  # the "person" of the background's stream (people are 0, 1, ...)
_SCRIPT, _LOOKS = 0, 1  # parts of a person's stream
# Time shares of one person's block: a neutral intro, then per expression onset/hold/offset/rest.
_INTRO_SHARE = 0.5
_RAMP_SHARES = {"onset": 0.22, "hold": 0.48, "offset": 0.22, "rest": 0.08}


@dataclass
class DemoClipOptions:
    """What to generate.

    Attributes:
        seed: Seed of every random stream (see the module docstring).
        seconds: Length of the clip, empty gaps included.
        fps: Frame rate (the clip's real rate).
        people: Number of people, one after the other.
        gap_s: Empty scene after each person.
        max_yaw: Extreme yaw of each person's motion, degrees.
        max_pitch: Extreme pitch, degrees.
        max_roll: Extreme roll, degrees.
        distance_mm: Nearest and farthest distance of the face (of the nose tip when frontal).
        drift_mm: Extreme sideways (x) and vertical (y) offset of the head's centre.
        peak_intensity: Range of an expression's peak intensity.
        label_threshold: Fraction of full intensity from which a frame is labelled with the
            expression (below it and above zero it is unlabelled).
        jpeg_quality: JPEG quality of the colour frames.
    """

    seed: int = 0
    seconds: float = 15.0
    fps: float = 30.0
    people: int = 2
    gap_s: float = 0.5
    max_yaw: float = 25.0
    max_pitch: float = 12.0
    max_roll: float = 8.0
    distance_mm: tuple[float, float] = (500.0, 800.0)
    drift_mm: tuple[float, float] = (50.0, 30.0)
    peak_intensity: tuple[float, float] = (0.8, 1.0)
    label_threshold: float = 0.6
    jpeg_quality: int = 80

    def __post_init__(self) -> None:
        if not self.fps > 0 or self.people < 1:
            raise ValueError(f"need fps > 0 and people >= 1, got fps {self.fps}, people {self.people}")
        if self.person_frames < 7 * len(_RAMP_SHARES):
            raise ValueError(f"{self.seconds} s for {self.people} people at {self.fps} fps leaves "
                             f"{self.person_frames} frames per person: too short for 7 expressions")
        if not 0 < self.label_threshold <= 1:
            raise ValueError(f"label_threshold must be in (0, 1], got {self.label_threshold}")
        if not 0 < self.distance_mm[0] <= self.distance_mm[1]:
            raise ValueError(f"bad distance range {self.distance_mm}")

    @property
    def gap_frames(self) -> int:
        return int(round(self.gap_s * self.fps))

    @property
    def person_frames(self) -> int:
        """Frames of one person's block, the gap after it excluded."""
        return int(round(self.seconds * self.fps / self.people)) - self.gap_frames


@dataclass
class FramePlan:
    """The script of one frame."""

    person: int  # -1: nobody in the scene
    expression: str  # the expression being made ("neutral" at rest, "" when empty)
    intensity: float  # 0..1 of its full strength
    label: str  # ground truth ("" = unlabelled)
    pose: RenderPose | None  # None when empty


def person_rng(seed: int, person: int, part: int) -> np.random.Generator:
    """A random stream of demo person ``person`` (see the module docstring).

    ``part`` keeps the script (:data:`_SCRIPT`: expressions, motion) apart from the looks
    (:data:`_LOOKS`: identity, skin, light), so changing one never reshuffles the other.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(DEMO_STREAM, person, part)))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _wander(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A smooth random curve over times ``t`` (s) whose extreme absolute value is exactly 1."""
    freqs = rng.uniform(0.07, 0.3, 3)  # Hz: slow, natural head motion
    phases = rng.uniform(0.0, 2.0 * np.pi, 3)
    amps = rng.uniform(0.5, 1.0, 3)
    curve = (amps[:, None] * np.sin(2.0 * np.pi * freqs[:, None] * t[None, :] + phases[:, None])).sum(0)
    curve -= curve.mean()
    return curve / max(np.abs(curve).max(), 1e-9)


def intensity_track(n: int, rng: np.random.Generator,
                    options: DemoClipOptions) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One person's block of ``n`` frames: per-frame expression, intensity and that expression's peak.

    A neutral intro, then the six expressions in a random order, each over an equal segment.
    """
    order = [str(e) for e in rng.permutation(list(EXPRESSIONS[1:]))]
    units = _INTRO_SHARE + len(order)
    edges = np.round((_INTRO_SHARE + np.arange(len(order) + 1)) / units * n).astype(int)
    names = [NEUTRAL] * n
    intensity = np.zeros(n, np.float32)  # (n,)
    peaks = np.zeros(n, np.float32)  # (n,)
    shares = np.cumsum([0.0, *_RAMP_SHARES.values()])  # onset, hold, offset, rest boundaries
    for name, start, stop in zip(order, edges[:-1], edges[1:]):
        peak = rng.uniform(*options.peak_intensity)
        x = (np.arange(stop - start) + 0.5) / (stop - start)  # position within the segment, 0..1
        up = _smoothstep((x - shares[0]) / (shares[1] - shares[0]))
        down = 1.0 - _smoothstep((x - shares[2]) / (shares[3] - shares[2]))
        intensity[start:stop] = peak * np.minimum(up, down)
        peaks[start:stop] = peak
        names[start:stop] = [name] * (stop - start)
    return names, intensity, peaks


def plan_clip(options: DemoClipOptions) -> list[FramePlan]:
    """The script of every frame: who, which expression, how strong, the label and the pose."""
    plan: list[FramePlan] = []
    n = options.person_frames
    t = np.arange(n) / options.fps  # (n,) s
    near, far = options.distance_mm
    empty = FramePlan(-1, "", 0.0, "", None)
    for person in range(options.people):
        rng = person_rng(options.seed, person, _SCRIPT)
        names, intensity, peaks = intensity_track(n, rng, options)
        yaw, pitch, roll = (limit * _wander(rng, t) for limit in
                            (options.max_yaw, options.max_pitch, options.max_roll))
        distance = 0.5 * (near + far) + 0.5 * (far - near) * _wander(rng, t)
        dx, dy = (limit * _wander(rng, t) for limit in options.drift_mm)
        for k in range(n):
            active = intensity[k] > 0
            if not active:
                label = NEUTRAL
            elif intensity[k] >= options.label_threshold * peaks[k]:
                label = names[k]
            else:
                label = ""  # on a ramp: too faint to call
            pose = RenderPose(yaw=float(yaw[k]), pitch=float(pitch[k]), roll=float(roll[k]),
                              distance_mm=float(distance[k]), offset_mm=(float(dx[k]), float(dy[k])))
            plan.append(FramePlan(person, names[k] if active else NEUTRAL, float(intensity[k]), label, pose))
        plan += [empty] * options.gap_frames
    return plan


def room_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A defocused indoor scene (H, W, 3) float32 RGB 0..255: wall, window, picture, shelf."""
    wall = rng.uniform([150, 140, 120], [225, 215, 200])
    rows = np.linspace(1.08, 0.85, height, dtype=np.float32)[:, None, None]  # light from above
    cols = 1.0 - 0.15 * np.linspace(-1, 1, width, dtype=np.float32)[None, :, None] ** 2
    img = np.ascontiguousarray(np.broadcast_to(wall * rows * cols, (height, width, 3)), np.float32)
    side = rng.choice([-1, 1])  # window on one side, picture on the other
    wx = int(width * (0.04 if side < 0 else 0.70))
    cv2.rectangle(img, (wx, 40), (wx + 150, 250), (235, 240, 250), -1)  # window
    cv2.rectangle(img, (wx, 40), (wx + 150, 250), (90, 80, 70), 6)
    cv2.line(img, (wx + 75, 40), (wx + 75, 250), (90, 80, 70), 4)
    px = int(width * (0.72 if side < 0 else 0.05))
    art = rng.uniform(40, 220, (3, 3))
    cv2.rectangle(img, (px, 60), (px + 120, 170), (50, 40, 35), -1)  # picture frame
    for i, colour in enumerate(art):
        cv2.rectangle(img, (px + 8 + 35 * i, 68), (px + 42 + 35 * i, 162), tuple(float(c) for c in colour), -1)
    cv2.rectangle(img, (0, 330), (width, 345), (110, 85, 60), -1)  # shelf
    for x in range(20, width - 30, 45):
        h = int(rng.integers(30, 70))
        cv2.rectangle(img, (x, 330 - h), (x + 30, 330), tuple(float(c) for c in rng.uniform(30, 200, 3)), -1)
    img[345:] *= 0.8  # below the shelf, in its shadow
    return cv2.GaussianBlur(img, (0, 0), 2.0)  # out of focus behind a face at arm's length


@dataclass
class DemoFrame:
    """One rendered frame of the clip."""

    frame: RGBDFrame  # ground_truth = the step's label
    nose_mm: np.ndarray  # (3,) nose tip in camera mm; NaN when the scene is empty


@dataclass
class _Person:
    """What stays fixed while one person is on screen."""

    identity: np.ndarray  # (K,) identity coefficients
    texture: np.ndarray  # (H, W, 3) uint8 atlas
    weights: dict[str, dict[str, float]]  # per expression: jittered blendshape weights at full strength
    pivot: tuple[float, float, float]  # mm: the head turns about its neutral bounding box's centre
    nose_ahead_mm: float  # nose tip z - pivot z: planned distances are the face's, not the pivot's
    renderer: ScanRenderer


class DemoClipRenderer:
    """Renders the frames of a :func:`plan_clip` script, one person at a time.

    The room, the light and each person's head stay fixed while the script runs; a new person
    gets a new renderer (its own light and depth-noise stream).
    """

    def __init__(self, options: DemoClipOptions, model: FaceModel | None = None,
                 render: RenderOptions | None = None) -> None:
        self.options = options
        self.model = model or FaceModel.load()
        # sensor noise a little below the renderer's default: JPEG keeps it, and it costs size
        self.render = render or RenderOptions(color_noise=1.5)
        k = self.render.intrinsics
        rng = person_rng(options.seed, _BACKGROUND, _LOOKS)
        self.background = room_background(rng, k.width, k.height)  # (H, W, 3) float32
        self._noise_rng = rng  # sensor noise of the colour frames
        self._person_id: int | None = None
        self._person: _Person | None = None
        self._mesh_key: tuple[str, float] | None = None
        self._mesh = None

    def _start_person(self, person: int) -> _Person:
        rng = person_rng(self.options.seed, person, _LOOKS)
        identity = self.model.random_identity(rng)
        tone = (person + rng.uniform()) / self.options.people  # spread over the range: people differ
        texture = self.model.procedural_texture(rng, skin_tone=tone)
        weights = {name: expression_weights(name, 1.0, rng) for name in EXPRESSIONS[1:]}
        neutral = self.model.vertices(identity)  # (V, 3) mm
        pivot = 0.5 * (neutral.min(0) + neutral.max(0))
        nose_ahead = float(neutral[self.model.landmarks_multipie68[30], 2] - pivot[2])
        # black, noise-free render: the fixed room and the sensor noise are added per frame
        light = random_light_direction(rng, LIGHT_SPREAD_DEG)
        options = dataclasses.replace(self.render, background="black", color_noise=0.0, light_direction=light,
                                      seed=int(rng.integers(2**63)))
        self.close()
        self._person_id, self._mesh_key = person, None
        return _Person(identity, texture, weights, tuple(float(v) for v in pivot), nose_ahead,
                       ScanRenderer(options))

    def process(self, step: FramePlan, sequence: int) -> DemoFrame:
        """Render one planned frame (``sequence`` = its index in the clip)."""
        k, opt = self.render.intrinsics, self.render
        color = self.background.copy()  # (H, W, 3) float32
        depth = np.zeros((k.height, k.width), np.uint16)
        nose = np.full(3, np.nan, np.float32)
        if step.person >= 0:
            if step.person != self._person_id:
                self._person = self._start_person(step.person)
            person = self._person
            key = (step.expression, step.intensity)
            if key != self._mesh_key:  # an unchanged mesh object lets the renderer reuse its scene
                weights = {s: w * step.intensity for s, w in person.weights.get(step.expression, {}).items()}
                self._mesh = self.model.mesh(person.identity, weights, person.texture)
                self._mesh_key = key
            pose = dataclasses.replace(step.pose, pivot=person.pivot,
                                       distance_mm=step.pose.distance_mm + person.nose_ahead_mm)
            result = person.renderer.process(self._mesh, pose, sequence)
            color[result.hit] = result.frame.color[result.hit]
            depth = result.frame.depth
            nose = result.landmarks_camera_mm["nose_tip"][0]
        if opt.color_noise > 0:
            color += np.float32(opt.color_noise) * self._noise_rng.standard_normal(color.shape, dtype=np.float32)
        frame = RGBDFrame(color=np.clip(color + 0.5, 0, 255).astype(np.uint8), depth=depth,
                          depth_scale=opt.depth_scale, intrinsics=k, sequence=sequence,
                          timestamp_ms=sequence * 1000.0 / self.options.fps,
                          ground_truth=step.label or None)
        return DemoFrame(frame, nose)

    def close(self) -> None:
        """Drop the current person's renderer (its ray-casting scene)."""
        if self._person is not None:
            self._person.renderer.close()
            self._person = None

    def __enter__(self) -> "DemoClipRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_demo_clip(out: str | Path, options: DemoClipOptions, progress: bool = True) -> Path:
    """Plan, render and write the clip (labels and extras as in the module docstring)."""
    plan = plan_clip(options)
    head_pose = np.full((len(plan), 6), np.nan, np.float32)  # (N, 6) yaw, pitch, roll deg, nose x, y, z mm

    def frames() -> Iterator[RGBDFrame]:
        with DemoClipRenderer(options) as renderer:
            for i, step in enumerate(tqdm(plan, desc="demo clip", unit="frame", disable=not progress)):
                rendered = renderer.process(step, i)
                if step.pose is not None:
                    head_pose[i] = (step.pose.yaw, step.pose.pitch, step.pose.roll, *rendered.nose_mm)
                yield rendered.frame

    extras = {
        "head_pose": head_pose,  # filled in place while write_demo_clip consumes frames(), before it reads extras
        "expression": np.array([step.expression for step in plan], dtype=str),
        "intensity": np.array([step.intensity for step in plan], np.float32),
        "person": np.array([step.person for step in plan], np.int16),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    path = write_demo_clip(out, frames(), fps=options.fps, labels=[step.label for step in plan],
                           extras=extras, jpeg_quality=options.jpeg_quality)
    if np.isnan(head_pose[extras["person"] >= 0]).any():
        raise RuntimeError(f"{path}: head poses were read before the frames were rendered")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate the built-in demo clip (see the usage block).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = DemoClipOptions()
    parser.add_argument("--out", type=Path, default=DEFAULT_DEMO_CLIP, help="clip file to write")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of every random draw")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="clip length")
    parser.add_argument("--fps", type=float, default=defaults.fps, help="frame rate (the clip's real rate)")
    parser.add_argument("--people", type=int, default=defaults.people, help="people, one after the other")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality, help="colour JPEG quality")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = DemoClipOptions(seed=args.seed, seconds=args.seconds, fps=args.fps, people=args.people,
                                  jpeg_quality=args.jpeg_quality)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = make_demo_clip(args.out, options)
    plan = plan_clip(options)
    labelled = sum(1 for step in plan if step.label)
    print(f"wrote {path}: {len(plan)} frames ({len(plan) / options.fps:.1f} s at {options.fps:g} fps), "
          f"{labelled} labelled, {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

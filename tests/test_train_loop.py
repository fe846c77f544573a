"""Augmentation, fit()/evaluate(), checkpoints and the toy CLI."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from realtime.spec import SPEC

from realtime.spec import EXPRESSIONS, GEOMETRY_CHANNELS, MASK_NAMES, PREPROCESSING_VERSION
from realtime.masks import flip_permutation
from train.augment import AugmentOptions, Augmenter
from train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from train.model import build_model
from train.train import ToyExpressionDataset, TrainConfig, evaluate, fit, lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(input_size=32, width=0.125, blocks=(1, 1, 1, 1))
NX, NY, NZ = (GEOMETRY_CHANNELS.index(c) for c in ("normal_x", "normal_y", "normal_z"))
NO_AUG = dict(flip_p=0, max_rotation_deg=0, max_shift_px=0, depth_noise_mm=0, brightness=0, contrast=0, saturation=0)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("afnet_m", **{**TINY, **kw})


def batch_of(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "texture": torch.rand(n, 3, size, size, generator=g),
        "geometry": torch.randn(n, len(GEOMETRY_CHANNELS), size, size, generator=g),
        "masks": torch.rand(n, len(MASK_NAMES), size, size, generator=g),
        "label": torch.arange(n),
    }


# ---------------------------------------------------------------------------------------------- augment


def test_flip_mirrors_maps_swaps_left_right_masks_and_negates_normal_x():
    batch = batch_of()
    out = Augmenter(AugmentOptions(**{**NO_AUG, "flip_p": 1.0}))(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out["texture"], batch["texture"].flip(-1))
    geometry = batch["geometry"].flip(-1)
    assert torch.equal(out["geometry"][:, NX], -geometry[:, NX])
    for c in (GEOMETRY_CHANNELS.index("depth"), NY, NZ):
        assert torch.equal(out["geometry"][:, c], geometry[:, c])
    mirrored = batch["masks"].flip(-1)
    pairs = {"left_eye": "right_eye", "right_eye": "left_eye", "left_brow": "right_brow",
             "right_brow": "left_brow", "nose": "nose", "mouth": "mouth"}
    for name, source in pairs.items():
        assert torch.equal(out["masks"][:, MASK_NAMES.index(name)], mirrored[:, MASK_NAMES.index(source)]), name
    assert torch.equal(out["label"], batch["label"])


def test_flip_twice_is_the_identity_and_bad_mask_names_are_refused():
    aug = Augmenter(AugmentOptions(**{**NO_AUG, "flip_p": 1.0}))
    batch = batch_of()
    twice = aug(aug(batch, torch.Generator()), torch.Generator())
    for key in ("texture", "geometry", "masks"):
        assert torch.equal(twice[key], batch[key])
    with pytest.raises(ValueError, match="left_ear"):
        flip_permutation(("left_ear", "nose"))


def plane(size, slope, angle):
    """Depth and unit normals of the plane z = slope * x rotated by ``angle`` about the z axis,
    rasterised on the canonical grid (x = column - centre, y = centre - row)."""
    c = (size - 1) / 2
    y, x = torch.meshgrid(c - torch.arange(size).float(), torch.arange(size).float() - c, indexing="ij")
    ca, sa = math.cos(angle), math.sin(angle)
    geometry = torch.zeros(1, len(GEOMETRY_CHANNELS), size, size)
    geometry[0, 0] = slope * (ca * x + sa * y)  # z(p) = slope * (R(-angle) p).x
    norm = math.sqrt(slope**2 + 1)
    geometry[0, NX], geometry[0, NY], geometry[0, NZ] = -slope * ca / norm, -slope * sa / norm, 1 / norm
    return geometry


def test_rotation_turns_depth_and_normals_together():
    size, slope, angle = 48, 0.02, math.radians(30)
    start = plane(size, slope, 0.0)
    batch = {"texture": torch.zeros(1, 3, size, size), "geometry": start, "masks": torch.zeros(1, 6, size, size)}
    aug = Augmenter(AugmentOptions(**NO_AUG))
    _, rotated, _ = aug.rotate_shift(batch["texture"], start, batch["masks"], torch.tensor([angle]), torch.zeros(1, 2))
    expected = plane(size, slope, angle)
    inner = (slice(None), slice(None), slice(12, 36), slice(12, 36))  # away from the zero padding
    assert torch.allclose(rotated[inner], expected[inner], atol=1e-4)


def test_shift_moves_content_by_whole_pixels():
    batch = batch_of(1)
    aug = Augmenter(AugmentOptions(**NO_AUG))
    texture, _, _ = aug.rotate_shift(batch["texture"], batch["geometry"], batch["masks"],
                                     torch.zeros(1), torch.tensor([[3.0, -2.0]]))
    assert torch.allclose(texture[..., 5:25, 8:28], batch["texture"][..., 7:27, 5:25], atol=1e-5)


def test_augmentation_is_deterministic_per_generator_and_keeps_ranges():
    aug = Augmenter(AugmentOptions())
    batch = batch_of(4)
    a = aug(batch, torch.Generator().manual_seed(5))
    b = aug(batch, torch.Generator().manual_seed(5))
    c = aug(batch, torch.Generator().manual_seed(6))
    for key in ("texture", "geometry", "masks"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["texture"], c["texture"])
    assert a["texture"].min() >= 0 and a["texture"].max() <= 1
    assert a["masks"].min() >= 0 and a["masks"].max() <= 1 + 1e-6


def test_depth_noise_only_where_there_is_data():
    geometry = torch.zeros(1, 4, 16, 16)
    geometry[0, 0], geometry[0, 3] = SPEC.depth_min_mm / SPEC.depth_scale_mm, 1.0  # off the face, as canonical writes it
    geometry[0, :, 4:12, 4:12] = torch.tensor([-0.2, 0.0, 0.0, 1.0]).view(4, 1, 1)
    batch = {"texture": torch.zeros(1, 3, 16, 16), "geometry": geometry, "masks": torch.zeros(1, 6, 16, 16)}
    out = Augmenter(AugmentOptions(**{**NO_AUG, "depth_noise_mm": 1.0}))(batch, torch.Generator().manual_seed(0))
    changed = out["geometry"][0, 0] != geometry[0, 0]
    assert changed[4:12, 4:12].all() and not changed[:4].any()
    assert torch.equal(out["geometry"][:, 1:], geometry[:, 1:])


def test_depth_only_batches_are_augmented_without_normals():
    batch = batch_of(2)
    batch["geometry"] = batch["geometry"][:, :1]
    out = Augmenter(AugmentOptions(flip_p=1.0))(batch, torch.Generator().manual_seed(0))
    assert out["geometry"].shape == (2, 1, 32, 32)


# ---------------------------------------------------------------------------------------------- fit / evaluate


def small_cfg(tmp_path=None, **kw):
    return TrainConfig(**{"epochs": 4, "batch_size": 16, "lr": 3e-3, "progress": False, "device": "cpu",
                          "warmup_epochs": 0.5, "out_dir": str(tmp_path) if tmp_path else None, **kw})


def test_fit_lowers_the_loss_writes_checkpoints_and_prints_a_final_line(tmp_path, capsys):
    model = tiny_model()
    train_set = ToyExpressionDataset(112, size=32, seed=0)
    val_set = ToyExpressionDataset(28, size=32, seed=1)
    before = evaluate(model, val_set)
    result = fit(model, train_set, val_set, small_cfg(tmp_path))
    after = evaluate(model, val_set)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert after.loss < before.loss
    assert result.steps == 4 * 7
    assert result.last_checkpoint == tmp_path / "last.pt" and result.last_checkpoint.is_file()
    assert result.best_checkpoint == tmp_path / "best.pt" and result.best_checkpoint.is_file()
    assert (tmp_path / "train_config.json").is_file()
    assert result.best_metric == max(h.val_accuracy for h in result.history)
    out = capsys.readouterr().out
    assert out.count("final:") == 1 and "best_val_acc" in out


def test_fit_is_deterministic_on_cpu():
    states = []
    for _ in range(2):
        model = tiny_model()
        fit(model, ToyExpressionDataset(48, size=32), None, small_cfg(epochs=1))
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_evaluate_counts_a_confusion_matrix_that_matches_the_predictions():
    model = tiny_model().eval()
    data = ToyExpressionDataset(21, size=32, seed=3)
    result = evaluate(model, data, batch_size=8)
    with torch.no_grad():
        pred = model(data.texture, data.geometry, data.masks.expand(21, -1, -1, -1))[0].argmax(1)
    expected = np.zeros((7, 7), dtype=np.int64)
    for t, p in zip(data.labels.tolist(), pred.tolist()):
        expected[t, p] += 1
    assert np.array_equal(result.confusion, expected)
    assert result.num_samples == 21
    assert result.accuracy == pytest.approx(np.trace(expected) / 21)
    assert result.per_class_accuracy[0] == pytest.approx(expected[0, 0] / expected[0].sum())
    assert result.class_names == EXPRESSIONS


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(epochs=10, warmup_epochs=1, min_lr_ratio=0.01)
    assert lr_factor(cfg, 0, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 99, 10) == pytest.approx(0.01, abs=1e-3)
    step = TrainConfig(epochs=10, warmup_epochs=0, schedule="step", step_epochs=3, step_gamma=0.5)
    assert [lr_factor(step, s, 10) for s in (29, 30, 61)] == pytest.approx([1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = tiny_model(mode="iwc", class_names=("a", "b", "c"))
    optimizer = torch.optim.AdamW(model.parameters())
    model(*(batch_of(2)[k] for k in ("texture", "geometry", "masks")))[0].sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer, epoch=3, step=30, best_metric=0.5,
                           train_config={"lr": 1e-3}, note="x")
    loaded, info = load_checkpoint(path, classes=("a", "b", "c"), preprocessing_version=PREPROCESSING_VERSION)
    assert torch.load(path, weights_only=True)["format"]  # plain data: the safe loader reads it
    assert info.config == model.config and info.class_names == ("a", "b", "c")
    assert (info.epoch, info.step, info.best_metric) == (3, 30, 0.5)
    assert (info.train_config, info.extra) == ({"lr": 1e-3}, {"note": "x"})
    assert info.preprocessing_version == PREPROCESSING_VERSION and info.optimizer_state["state"]
    model.eval()
    x = batch_of(3)
    with torch.no_grad():
        feeds = (x["texture"], x["geometry"], x["masks"])
        for a, b in zip(model(*feeds), loaded(*feeds)):
            assert torch.equal(a, b)


def one_line_error(path, **kw):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, **kw)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    return message


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", tiny_model())
    assert "no such" in one_line_error(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in one_line_error(truncated)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    one_line_error(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert "not an AFNet-M checkpoint" in one_line_error(foreign)
    assert "differ" in one_line_error(good, classes=("a", "b"))
    assert "preprocessing" in one_line_error(good, preprocessing_version="canon0-old")


def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", tiny_model())
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["width"] = 0.25
    torch.save(payload, path)
    assert "do not fit" in one_line_error(path)


# ---------------------------------------------------------------------------------------------- CLI


def test_toy_cli_runs_and_writes_checkpoints(tmp_path):
    cmd = [sys.executable, "-m", "train.train", "--toy", "--epochs", "1", "--samples", "32", "--size", "32",
           "--width", "0.125", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "final:" in proc.stdout
    model, info = load_checkpoint(tmp_path / "last.pt")
    assert info.epoch == 1 and model.config.input_size == 32


def test_rotation_brings_in_the_off_face_background_not_zeros():
    floor = SPEC.depth_min_mm / SPEC.depth_scale_mm
    geometry = torch.zeros(1, 4, 32, 32)
    geometry[0, 0], geometry[0, 3] = floor, 1.0
    batch = {"texture": torch.zeros(1, 3, 32, 32), "geometry": geometry, "masks": torch.zeros(1, 6, 32, 32)}
    out = Augmenter(AugmentOptions(**{**NO_AUG, "max_rotation_deg": 30.0}))(batch, torch.Generator().manual_seed(1))
    corners = out["geometry"][0, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (4 channels, 4 corners)
    assert torch.allclose(corners, torch.tensor([floor, 0.0, 0.0, 1.0]).view(4, 1).expand(4, 4), atol=1e-5)

"""ONNX export: parity with PyTorch, metadata through ONNX Runtime, dynamic batch, CLI errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.export_onnx import ExportError, export_onnx, main, random_inputs
from realtime.model_metadata import INPUT_NAMES, OUTPUT_NAMES, ModelMetadata
from realtime.spec import EXPRESSIONS, GEOMETRY_CHANNELS, MASK_NAMES, PREPROCESSING_VERSION
from train.checkpoint import save_checkpoint
from train.model import MODES, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(input_size=32, width=0.125, blocks=(1, 1, 1, 1))


def tiny_model(**kw):
    torch.manual_seed(0)
    model = build_model("afnet_m", **{**TINY, **kw})
    # Non-trivial batch-norm statistics, so the export is checked on more than identity norms.
    model.train()
    with torch.no_grad():
        for seed in range(3):
            feeds = random_inputs({"texture": [3, 32, 32], "geometry": [4, 32, 32], "masks": [6, 32, 32]}, 4, seed)
            model(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "full.onnx"
    return export_onnx(tiny_model(), path)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_matches_pytorch_and_reports_size(exported):
    assert exported.max_abs_diff <= 1e-4
    assert exported.path.is_file() and exported.size_bytes == exported.path.stat().st_size > 0
    assert exported.opset >= 17


def test_metadata_round_trips_through_onnxruntime(exported):
    props = session(exported.path).get_modelmeta().custom_metadata_map
    meta = ModelMetadata.from_props(props, str(exported.path))
    assert meta == exported.metadata
    meta.check_preprocessing(str(exported.path))
    assert meta.class_names == EXPRESSIONS and meta.preprocessing_version == PREPROCESSING_VERSION
    assert meta.input_shapes == {"texture": [3, 32, 32], "geometry": [len(GEOMETRY_CHANNELS), 32, 32],
                                 "masks": [len(MASK_NAMES), 32, 32]}
    assert meta.fuse_stages == (2, 3, 4) and meta.config["mode"] == "full"
    assert meta.model_version.startswith("afnet_m-full-")


def test_dynamic_batch_and_io_names(exported):
    sess = session(exported.path)
    assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    for batch in (1, 4):
        logits, weights = sess.run(None, random_inputs(exported.metadata.input_shapes, batch, seed=7))
        assert logits.shape == (batch, len(EXPRESSIONS)) and weights.shape == (batch, 3, 2)
        assert np.allclose(weights.sum(-1), 1, atol=1e-5)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "full"])
def test_every_ablation_exports_with_the_same_interface(tmp_path, mode):
    report = export_onnx(tiny_model(mode=mode), tmp_path / f"{mode}.onnx")
    sess = session(report.path)
    assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)  # unused inputs stay declared
    logits, weights = sess.run(None, random_inputs(report.metadata.input_shapes, 2))
    assert logits.shape == (2, len(EXPRESSIONS)) and weights.shape == (2, 3, 2)
    assert report.max_abs_diff <= 1e-4


def test_export_refuses_a_model_with_other_classes(tmp_path):
    with pytest.raises(ExportError, match="differ"):
        export_onnx(tiny_model(), tmp_path / "m.onnx", classes=("a", "b"))


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", tiny_model(), epoch=1)


def test_cli_as_a_script_path_exports_and_prints_the_diff(checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "export_onnx.py"), str(checkpoint), "-o", str(out),
                           "--opset", "17", "--classes", ",".join(EXPRESSIONS)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "max |torch - onnxruntime|" in proc.stdout and "MB" in proc.stdout
    assert ModelMetadata.from_props(session(out).get_modelmeta().custom_metadata_map).class_names == EXPRESSIONS


def test_cli_error_is_one_line_without_traceback(checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "export_onnx.py"), str(checkpoint), "-o",
                           str(tmp_path / "m.onnx"), "--classes", "a,b,c"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert str(checkpoint) in proc.stderr


def run_main(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_missing_and_truncated_checkpoints_exit_2(checkpoint, tmp_path, capsys):
    code, err = run_main([tmp_path / "nope.pt", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "nope.pt" in err and err.count("\n") == 1
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    code, err = run_main([truncated, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "t.pt" in err and err.count("\n") == 1


def test_cli_other_preprocessing_version_exits_2(checkpoint, tmp_path, capsys):
    payload = torch.load(checkpoint, weights_only=True)
    payload["preprocessing_version"] = "canon0-old"
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    code, err = run_main([old, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "canon0-old" in err and err.count("\n") == 1


def test_cli_parity_failure_exits_nonzero(checkpoint, tmp_path, capsys):
    code, err = run_main([checkpoint, "-o", tmp_path / "m.onnx", "--tolerance", "-1"], capsys)
    assert code == 1 and "differs from PyTorch" in err


def test_cli_refuses_an_old_opset(checkpoint, tmp_path, capsys):
    code, err = run_main([checkpoint, "-o", tmp_path / "m.onnx", "--opset", "11"], capsys)
    assert code == 2 and "opset" in err

"""Scoring a model file on cached samples: the exported ONNX (through the runtime engine) and its checkpoint agree."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting a test model needs the train extra (torch)")

from export.export_onnx import export_onnx  # noqa: E402
from test_pack_cache import write_cache  # noqa: E402
from train.checkpoint import save_checkpoint  # noqa: E402
from train.evaluate import evaluate_file, main  # noqa: E402
from train.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = build_model("afnet_m_rt", width=0.125)
    checkpoint = save_checkpoint(root / "m.pt", model)
    return root, checkpoint, export_onnx(checkpoint, root / "m.onnx").path


def test_onnx_and_checkpoint_give_the_same_confusion(model_files, tmp_path):
    _, checkpoint, onnx_path = model_files
    write_cache(tmp_path / "cache", 3)
    by_onnx = evaluate_file(onnx_path, tmp_path / "cache", None)
    by_checkpoint = evaluate_file(checkpoint, tmp_path / "cache", None)
    assert by_onnx["samples"] == 3 and np.sum(by_onnx["confusion"]) == 3
    assert by_onnx["confusion"] == by_checkpoint["confusion"]
    happiness = by_onnx["class_names"].index("happiness")
    assert by_onnx["accuracy"] == np.array(by_onnx["confusion"])[happiness, happiness] / 3


def test_bad_inputs_are_one_line_and_exit_2(model_files, tmp_path, capsys):
    root, _, onnx_path = model_files
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    write_cache(tmp_path / "cache", 1)
    assert main([str(tmp_path / "bad.pt"), "--cache", str(tmp_path / "cache")]) == 2
    assert main([str(onnx_path), "--cache", str(tmp_path / "empty")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("evaluate: ") for line in errors)

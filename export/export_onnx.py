"""Export an AFNet-M checkpoint to ONNX with the runtime's metadata, and prove it matches PyTorch.

Usage:
    python export/export_onnx.py runs/bu3dfe/best.pt -o models/afnet_m_rt.onnx
    python export/export_onnx.py best.pt -o m.onnx --opset 18 \
        --classes neutral,anger,disgust,fear,happiness,sadness,surprise
    python -m export.export_onnx best.pt -o m.onnx          # same, as a module

What it does: torch.onnx.export (TorchScript exporter, dynamo=False) with inputs texture /
geometry / masks and outputs logits / modality_weights, a dynamic batch axis, metadata from
:class:`realtime.model_metadata.ModelMetadata`, the ONNX checker; then one random batch through
PyTorch and ONNX Runtime (CPU). Prints the max |difference| and the file size.

Exit codes: 0 done; 1 the ONNX model disagrees with PyTorch (max |diff| > --tolerance);
2 bad input (missing/corrupt checkpoint, class list or preprocessing version differs).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: make the repo's packages importable
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import argparse
import copy
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from realtime.model_metadata import INPUT_NAMES, OUTPUT_NAMES, ModelMetadata
from realtime.spec import GEOMETRY_CHANNELS, PREPROCESSING_VERSION
from train.checkpoint import CheckpointError, load_checkpoint
from train.model import AFNet

DEFAULT_OPSET = 17
MIN_OPSET = 17


class ExportError(RuntimeError):
    """The export cannot be done or did not verify; the message is one line."""


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


@dataclass
class ExportReport:
    """Outcome of :func:`export_onnx`."""

    path: Path
    max_abs_diff: float  # max |PyTorch - ONNX Runtime| over both outputs of the check batch
    size_bytes: int
    opset: int
    metadata: ModelMetadata
    check_batch: int


def input_shapes(model: AFNet) -> dict[str, list[int]]:
    """Per-input [C, H, W] the runtime must feed (the whole geometry stack, whatever in_geometry is)."""
    cfg = model.config
    s = cfg.input_size
    return {"texture": [3, s, s], "geometry": [len(GEOMETRY_CHANNELS), s, s], "masks": [cfg.num_masks, s, s]}


def weights_digest(model: torch.nn.Module) -> str:
    """Short hash of the state dict: the model version says which weights these are."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def random_inputs(shapes: dict[str, list[int]], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A plausible random batch: texture and masks in [0, 1], geometry around zero."""
    rng = np.random.default_rng(seed)
    return {
        "texture": rng.random((batch, *shapes["texture"]), dtype=np.float32),
        "geometry": (rng.standard_normal((batch, *shapes["geometry"])) * 0.5).astype(np.float32),
        "masks": rng.random((batch, *shapes["masks"]), dtype=np.float32),
    }


def _declare_all_inputs(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Ablations ignore some inputs and the exporter drops unused inputs; declare them again so
    every mode has the same interface (ONNX allows graph inputs that no node reads)."""
    present = {i.name: i for i in proto.graph.input}
    ordered = []
    for name in INPUT_NAMES:
        if name in present:
            ordered.append(present[name])
        else:
            ordered.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", *shapes[name]]))
    extra = [i for i in proto.graph.input if i.name not in INPUT_NAMES]  # initializers, if kept as inputs
    del proto.graph.input[:]
    proto.graph.input.extend(ordered + extra)


def export_onnx(
    checkpoint_or_model: str | Path | AFNet,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    classes: tuple[str, ...] | list[str] | None = None,
    check_batch: int = 3,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> ExportReport:
    """Export, add metadata, check, and compare ONNX Runtime with PyTorch on a random batch.

    Args:
        checkpoint_or_model: A checkpoint path, or an :class:`AFNet` (taken as made for the current
            preprocessing version).
        out_path: The .onnx file to write.
        opset: ONNX opset (>= 17).
        classes: If given, must equal the model's class list (names and order).
        check_batch: Batch size of the parity check (not 1, so the dynamic batch axis is exercised).
        tolerance: Largest allowed max |difference|.
        seed: Seed of the random check batch.

    Raises:
        CheckpointError: The checkpoint is missing, unreadable, or does not fit ``classes`` or the
            current preprocessing version.
        ExportError: Bad arguments; ParityError when the outputs disagree (the file stays, for
            inspection).
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    if isinstance(checkpoint_or_model, AFNet):
        model, version = copy.deepcopy(checkpoint_or_model), PREPROCESSING_VERSION  # leave the caller's as is
        if classes is not None and tuple(classes) != model.config.class_names:
            raise ExportError(f"model classes {','.join(model.config.class_names)} differ from {','.join(classes)}")
    else:
        model, info = load_checkpoint(checkpoint_or_model, classes=classes, preprocessing_version=PREPROCESSING_VERSION)
        version = info.preprocessing_version
    model = model.cpu().eval()
    cfg = model.config
    shapes = input_shapes(model)
    metadata = ModelMetadata(
        class_names=cfg.class_names,
        input_shapes=shapes,
        preprocessing_version=version,
        model_version=f"{cfg.name}-{cfg.mode}-{weights_digest(model)}",
        fuse_stages=cfg.fuse_stages,
        config=cfg.to_dict(),
    )

    example = {k: torch.from_numpy(v) for k, v in random_inputs(shapes, 1, seed + 1).items()}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice is expected
        torch.onnx.export(
            model, tuple(example[name] for name in INPUT_NAMES), buffer,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _declare_all_inputs(proto, shapes)
    for key, value in metadata.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"AFNet-M {cfg.name} ({cfg.mode}) for preprocessing {version}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{out_path}: ONNX checker failed ({str(exc).splitlines()[0]})") from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, out_path)

    feeds = random_inputs(shapes, check_batch, seed)
    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(list(OUTPUT_NAMES), feeds)
    with torch.no_grad():
        torch_out = model(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES))
    diff = max(float(np.abs(o - t.numpy()).max()) for o, t in zip(onnx_out, torch_out))
    report = ExportReport(out_path, diff, out_path.stat().st_size, opset, metadata, check_batch)
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(f"{out_path}: ONNX Runtime differs from PyTorch by {diff:.3g} > {tolerance:g}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export an AFNet-M checkpoint to ONNX (see the usage block in this file).")
    parser.add_argument("checkpoint", help="checkpoint written by train.train (last.pt / best.pt)")
    parser.add_argument("-o", "--output", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--classes", default=None, help="comma-separated class list the checkpoint must have")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |PyTorch - ORT| (default 1e-4)")
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        report = export_onnx(args.checkpoint, args.output, opset=args.opset, classes=classes, tolerance=args.tolerance)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = report.metadata
    print(f"wrote {report.path} ({report.size_bytes / 1e6:.2f} MB, opset {report.opset}) model_version "
          f"{meta.model_version} classes {','.join(meta.class_names)}; max |torch - onnxruntime| "
          f"{report.max_abs_diff:.2e} on a batch of {report.check_batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

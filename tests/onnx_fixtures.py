"""A tiny ONNX model with AFNet-M's real I/O contract and metadata, built with ``onnx.helper``.

Stands in for a real AFNet-M export in the engine, build and Triton tests (the lead switches them
to a real export later). Inputs ``texture`` (B,3,112,112), ``geometry`` (B,4,112,112) and
``masks`` (B,6,112,112); outputs ``logits`` (B,NC) and ``modality_weights`` (B,F,2), batch axis
dynamic, metadata written with :class:`realtime.model_metadata.ModelMetadata`. The graph uses
only plain ONNX operators (Conv, Relu, AveragePool, Concat, Gemm, Softmax) so ONNX Runtime can
quantise it and TensorRT can parse it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from realtime.model_metadata import INPUT_NAMES, OUTPUT_NAMES, ModelMetadata
from realtime.spec import EXPRESSIONS, GEOMETRY_CHANNELS, MASK_NAMES, PREPROCESSING_VERSION, SPEC

OPSET = 17
CHANNELS = {"texture": 3, "geometry": len(GEOMETRY_CHANNELS), "masks": len(MASK_NAMES)}


def tiny_metadata(
    class_names: tuple[str, ...] = EXPRESSIONS,
    fuse_stages: tuple[int, ...] = (3, 4),
    preprocessing_version: str = PREPROCESSING_VERSION,
) -> ModelMetadata:
    """The metadata the tiny model carries (the real contract's keys, a toy config)."""
    return ModelMetadata(
        class_names=tuple(class_names),
        input_shapes={name: [CHANNELS[name], SPEC.size, SPEC.size] for name in INPUT_NAMES},
        preprocessing_version=preprocessing_version,
        model_version="tiny-fixture-1",
        fuse_stages=tuple(fuse_stages),
        config={"name": "tiny_fixture", "mode": "full"},
    )


def make_tiny_model(
    path: str | Path,
    metadata: ModelMetadata | None = None,
    *,
    with_metadata: bool = True,
    seed: int = 0,
) -> Path:
    """Write the tiny model to ``path`` and return the path.

    The classifier head is centred and scaled on synthetic feeds (its pooled features' mean and
    spread), so the predicted class varies from sample to sample as a trained model's would;
    with raw random weights every sample would land in one class and top-1 comparisons
    (quantised vs float) would say nothing.

    Args:
        path: Where to write the ``.onnx`` file.
        metadata: Metadata to embed (default :func:`tiny_metadata`); its class count and fuse
            stages size the outputs.
        with_metadata: False writes a model without any AFNet-M metadata (a foreign model).
        seed: Seed of the random weights.
    """
    import onnxruntime as ort

    from realtime.engine import synthetic_feeds

    metadata = metadata or tiny_metadata()
    rng = np.random.default_rng(seed)
    num_classes, num_fused = len(metadata.class_names), len(metadata.fuse_stages)

    def weight(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)

    params = {
        "tex_w": weight(8, 3, 4, 4), "tex_b": weight(8),
        "geo_w": weight(8, 4, 4, 4), "geo_b": weight(8),
        "fuse_w": weight(16, 22, 3, 3), "fuse_b": weight(16),
        "head_w": weight(num_classes, 16), "head_b": np.zeros(num_classes, np.float32),
        "iwc_w": weight(2 * num_fused, 16), "iwc_b": weight(2 * num_fused),
        "iwc_shape": np.array([0, num_fused, 2], np.int64),
    }
    probe = ort.InferenceSession(_graph(metadata, params, expose="fuse_vec").SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    features = probe.run(["fuse_vec"], synthetic_feeds(metadata, 64, seed=seed + 1000))[0]  # (64, 16)
    # one gain for all features: per-feature scaling would blow up the near-constant ones,
    # whose variation is below INT8 resolution
    head_w = params["head_w"] * (2.0 / features.std(axis=0).mean())  # (NC, 16)
    params["head_w"], params["head_b"] = head_w, -(head_w @ features.mean(axis=0))

    model = _graph(metadata, params)
    if with_metadata:
        helper.set_model_props(model, metadata.to_props())
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path


def _graph(metadata: ModelMetadata, params: dict[str, np.ndarray], expose: str | None = None) -> onnx.ModelProto:
    """The tiny model's graph with weights ``params``; ``expose`` adds an inner tensor as output."""
    num_classes, num_fused = len(metadata.class_names), len(metadata.fuse_stages)
    nodes = [
        # 2D and 3D stems: (B, 8, 28, 28) each; masks pooled to the same size: (B, 6, 28, 28)
        helper.make_node("Conv", ["texture", "tex_w", "tex_b"], ["tex_c"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Relu", ["tex_c"], ["tex_f"]),
        helper.make_node("Conv", ["geometry", "geo_w", "geo_b"], ["geo_c"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Relu", ["geo_c"], ["geo_f"]),
        helper.make_node("AveragePool", ["masks"], ["mask_f"], kernel_shape=[4, 4], strides=[4, 4]),
        # fused trunk -> logits (B, NC)
        helper.make_node("Concat", ["tex_f", "geo_f", "mask_f"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "fuse_w", "fuse_b"], ["fuse_c"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["fuse_c"], ["fuse_f"]),
        helper.make_node("GlobalAveragePool", ["fuse_f"], ["fuse_gap"]),
        helper.make_node("Flatten", ["fuse_gap"], ["fuse_vec"], axis=1),
        helper.make_node("Gemm", ["fuse_vec", "head_w", "head_b"], ["logits"], transB=1),
        # importance weights per fused stage: softmax over (2D, 3D) -> (B, F, 2)
        helper.make_node("GlobalAveragePool", ["tex_f"], ["tex_gap"]),
        helper.make_node("GlobalAveragePool", ["geo_f"], ["geo_gap"]),
        helper.make_node("Concat", ["tex_gap", "geo_gap"], ["gap_cat"], axis=1),
        helper.make_node("Flatten", ["gap_cat"], ["gap_vec"], axis=1),
        helper.make_node("Gemm", ["gap_vec", "iwc_w", "iwc_b"], ["iwc_flat"], transB=1),
        helper.make_node("Reshape", ["iwc_flat", "iwc_shape"], ["iwc_logits"]),
        helper.make_node("Softmax", ["iwc_logits"], ["modality_weights"], axis=2),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *metadata.input_shapes[name]])
        for name in INPUT_NAMES
    ]
    outputs = [
        helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, ["batch", num_classes]),
        helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.FLOAT, ["batch", num_fused, 2]),
    ]
    if expose:
        outputs.append(helper.make_tensor_value_info(expose, TensorProto.FLOAT, None))
    initializers = [numpy_helper.from_array(value, name) for name, value in params.items()]
    graph = helper.make_graph(nodes, "tiny_afnet", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnx_fixtures")
    model.ir_version = 8  # ONNX Runtime 1.32 and TensorRT 10 both read IR 8
    return model


def write_corrupt_model(path: str | Path) -> Path:
    """Write a file that is not a loadable ONNX model (the first bytes of a real one, then junk)."""
    path = Path(path)
    path.write_bytes(b"\x08\x08\x12\x0bonnx_fixtures" + bytes(range(256)) * 4)
    return path

#!/usr/bin/env python3
"""Write a Triton Inference Server model repository for an AFNet-M export (ONNX or TensorRT plan).

Usage:
    python export/triton_repo.py model.onnx --out triton_repo
    python export/triton_repo.py model.onnx --out triton_repo --plan model.fp16.plan --max-batch 8 \
        --preferred-batch 4,8 --max-queue-delay-us 500 --instances 2
    tritonserver --model-repository triton_repo
    python run_camera.py --backend triton --triton-url 127.0.0.1:8000       # the client side

Layout: ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/<version>/model.onnx`` (platform
``onnxruntime_onnx``) or ``model.plan`` (``tensorrt_plan``, with ``--plan``). The config declares
the three inputs and two outputs without the batch axis (Triton adds it: ``max_batch_size``),
dynamic batching with the preferred sizes and queue delay, an instance group, and the model's
AFNet-M metadata as ``parameters`` so a client (``realtime.engine_triton``) can check the
served model's classes and preprocessing without a copy of the file. The ONNX is always needed:
it is the source of the metadata, and a plan must come from the same model (its sidecar's
metadata must match).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realtime.engine_cache import CacheError, read_plan
from realtime.engine import DEFAULT_TRITON_MODEL, EngineError, read_model_metadata
from realtime.model_metadata import INPUT_NAMES, ModelMetadata, ModelMismatchError

INSTANCE_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass
class TritonRepoOptions:
    """What to write; see the usage block for the flags."""

    onnx_path: Path
    out: Path
    plan_path: Path | None = None
    name: str = DEFAULT_TRITON_MODEL
    version: int = 1
    max_batch: int = 8
    preferred_batch: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 500
    instances: int = 1
    instance_kind: str = "auto"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r}: use letters, digits, '_', '.', '-'")
        if self.version < 1:
            raise ValueError(f"version must be >= 1, got {self.version}")
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")
        bad = [b for b in self.preferred_batch if not 1 <= b <= self.max_batch]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} are outside 1..{self.max_batch} (max batch)")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max queue delay must be >= 0, got {self.max_queue_delay_us}")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}")


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def model_config_text(metadata: ModelMetadata, options: TritonRepoOptions, platform: str) -> str:
    """The ``config.pbtxt`` of the model (protobuf text format of Triton's ModelConfig)."""
    tensors = [(name, metadata.input_shapes[name]) for name in INPUT_NAMES]
    outputs = [("logits", [len(metadata.class_names)]), ("modality_weights", [len(metadata.fuse_stages), 2])]

    def block(items: list[tuple[str, list[int]]]) -> str:
        entries = [f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: {_dims(dims)}\n  }}'
                   for name, dims in items]
        return ",\n".join(entries)

    parameters = "\n".join(
        f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}"
        for key, value in sorted(metadata.to_props().items())
    )
    preferred = f"  preferred_batch_size: {_dims(list(options.preferred_batch))}\n" if options.preferred_batch else ""
    return (
        f'name: "{options.name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {options.max_batch}\n"
        f"input [\n{block(tensors)}\n]\n"
        f"output [\n{block(outputs)}\n]\n"
        f"dynamic_batching {{\n{preferred}  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {INSTANCE_KINDS[options.instance_kind]}\n"
        f"  }}\n]\n"
        f"{parameters}\n"
    )


def write_triton_repo(options: TritonRepoOptions) -> Path:
    """Write the model directory into the repository; return ``REPO/<name>``.

    Raises:
        EngineError: The ONNX is missing or unloadable.
        ModelMismatchError: Not an AFNet-M export for this runtime, or the plan is of another model.
        CacheError: The plan or its sidecar is unusable.
        ValueError: The plan's batch profile is smaller than ``max_batch``.
    """
    metadata = read_model_metadata(options.onnx_path)
    model_dir = Path(options.out) / options.name
    if options.plan_path is not None:
        _, plan = read_plan(options.plan_path)
        plan_meta = ModelMetadata.from_props(plan.info.get("metadata") or {}, source=str(options.plan_path))
        if plan_meta != metadata:
            raise ModelMismatchError(f"{options.plan_path}: plan is of another model than {options.onnx_path}")
        if plan.key.profile[2] < options.max_batch:
            raise ValueError(f"{options.plan_path}: plan allows batches up to {plan.key.profile[2]}, "
                             f"below --max-batch {options.max_batch}; rebuild with --max-batch {options.max_batch}")
        platform, source, target = "tensorrt_plan", Path(options.plan_path), "model.plan"
    else:
        platform, source, target = "onnxruntime_onnx", Path(options.onnx_path), "model.onnx"
    version_dir = model_dir / str(options.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, version_dir / target)
    (model_dir / "config.pbtxt").write_text(model_config_text(metadata, options, platform))
    return model_dir


def _batch_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("onnx", type=Path, help="AFNet-M ONNX export (source of the metadata)")
    parser.add_argument("--out", type=Path, required=True, help="model repository directory")
    parser.add_argument("--plan", type=Path, default=None, help="serve this TensorRT plan instead of the ONNX")
    parser.add_argument("--name", default=DEFAULT_TRITON_MODEL, help="model name in the repository")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--preferred-batch", type=_batch_list, default=(4, 8), help="e.g. 4,8")
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--instances", type=int, default=1, help="model instances (per GPU for kind gpu)")
    parser.add_argument("--instance-kind", choices=INSTANCE_KINDS, default="auto")
    args = parser.parse_args(argv)
    try:
        options = TritonRepoOptions(args.onnx, args.out, args.plan, args.name, args.version, args.max_batch,
                                    args.preferred_batch, args.max_queue_delay_us, args.instances, args.instance_kind)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        model_dir = write_triton_repo(options)
    except (EngineError, ModelMismatchError, CacheError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target = "model.plan" if options.plan_path else "model.onnx"
    print(f"wrote {model_dir}/config.pbtxt and {options.version}/{target} (max batch {options.max_batch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

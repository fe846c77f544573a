"""What an exported model declares about itself, and how the runtime checks it.

The exporter writes these keys into the ONNX ``metadata_props``; ONNX Runtime reads them
back as ``get_modelmeta().custom_metadata_map``. A model is usable only if its
``preprocessing_version`` equals the runtime's :data:`realtime.spec.PREPROCESSING_VERSION`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from realtime.spec import PREPROCESSING_VERSION

INPUT_NAMES = ("texture", "geometry", "masks")
OUTPUT_NAMES = ("logits", "modality_weights")
_PREFIX = "afnet."


class ModelMismatchError(ValueError):
    """The model file cannot be used by this runtime (metadata missing or different)."""


@dataclass(frozen=True)
class ModelMetadata:
    class_names: tuple[str, ...]
    input_shapes: dict[str, list[int]]  # per input, without the batch axis: [C, H, W]
    preprocessing_version: str
    model_version: str
    fuse_stages: tuple[int, ...]  # backbone stages whose IWC weights ``modality_weights`` holds
    config: dict  # the model config, as trained

    def to_props(self) -> dict[str, str]:
        """String key/value pairs for ONNX ``metadata_props``."""
        return {
            _PREFIX + "class_names": json.dumps(list(self.class_names)),
            _PREFIX + "input_shapes": json.dumps(self.input_shapes),
            _PREFIX + "preprocessing_version": self.preprocessing_version,
            _PREFIX + "model_version": self.model_version,
            _PREFIX + "fuse_stages": json.dumps(list(self.fuse_stages)),
            _PREFIX + "config": json.dumps(self.config, sort_keys=True),
        }

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelMetadata":
        """Parse metadata props; raises :class:`ModelMismatchError` naming ``source``."""
        try:
            return cls(
                class_names=tuple(json.loads(props[_PREFIX + "class_names"])),
                input_shapes={k: list(v) for k, v in json.loads(props[_PREFIX + "input_shapes"]).items()},
                preprocessing_version=props[_PREFIX + "preprocessing_version"],
                model_version=props[_PREFIX + "model_version"],
                fuse_stages=tuple(json.loads(props[_PREFIX + "fuse_stages"])),
                config=json.loads(props[_PREFIX + "config"]),
            )
        except KeyError as exc:
            raise ModelMismatchError(f"{source}: not an AFNet-M export (metadata {exc.args[0]!r} missing)") from None
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise ModelMismatchError(f"{source}: unreadable AFNet-M metadata ({exc})") from None

    def check_preprocessing(self, source: str = "model") -> None:
        """Refuse a model trained on other canonical maps than this runtime makes."""
        if self.preprocessing_version != PREPROCESSING_VERSION:
            raise ModelMismatchError(
                f"{source}: model expects preprocessing {self.preprocessing_version!r}, "
                f"this runtime makes {PREPROCESSING_VERSION!r}; re-export the model or update the runtime"
            )

from realtime.model_metadata import ModelMetadata, ModelMismatchError
from realtime.spec import PREPROCESSING_VERSION, SPEC

import pytest


def _meta(version=PREPROCESSING_VERSION):
    return ModelMetadata(("a", "b"), {"texture": [3, SPEC.size, SPEC.size]}, version, "t1", (3, 4), {"w": 1})


def test_metadata_round_trips_through_props():
    meta = _meta()
    assert ModelMetadata.from_props(meta.to_props()) == meta


def test_other_preprocessing_is_refused_with_one_line():
    with pytest.raises(ModelMismatchError) as err:
        _meta("canon0-old").check_preprocessing("m.onnx")
    assert "m.onnx" in str(err.value) and "\n" not in str(err.value)


def test_missing_metadata_names_the_key():
    with pytest.raises(ModelMismatchError, match="class_names"):
        ModelMetadata.from_props({}, "x.onnx")

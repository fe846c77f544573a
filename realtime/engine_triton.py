"""Triton Inference Server client backend (HTTP, ``tritonclient[http]``, imported lazily).

The server is the source of truth for what it serves: the AFNet-M metadata comes from the model
config's ``parameters`` that ``export/triton_repo.py`` writes (the same props as the ONNX
metadata), and is checked against this runtime's preprocessing like a local model. Requests
carry the three inputs as binary FP32 tensors; batches above the config's ``max_batch_size`` are
split by :meth:`Engine.infer`.

HTTP, not gRPC: ``tritonclient[grpc]`` 2.73 needs protobuf >= 5, which mediapipe 0.10.21 and
onnx 1.22 (protobuf < 5) exclude; ``tritonclient[http]`` installs beside them.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from realtime.engine import Engine, EngineError
from realtime.model_metadata import INPUT_NAMES, OUTPUT_NAMES, ModelMetadata, ModelMismatchError

INSTALL_HINT = "pip install 'tritonclient[http]==2.73.0'"
_URL = re.compile(r"^(?:https?://)?(?P<host>[A-Za-z0-9.\-_]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def import_triton_http() -> Any:
    """``tritonclient.http``, or one :class:`EngineError` line saying how to install it."""
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise EngineError(f"tritonclient is not installed ({INSTALL_HINT})") from None
    return httpclient


def parse_url(url: str) -> str:
    """Check a ``host:port`` URL (an ``http://`` prefix is dropped); raises ValueError."""
    match = _URL.match(url.strip()) if url else None
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"Triton URL {url!r} is not host:port (e.g. 127.0.0.1:8000)")
    return f"{match['host']}:{match['port']}"


def metadata_from_triton_config(config: dict, source: str) -> ModelMetadata:
    """AFNet-M metadata from a model config as Triton's HTTP API returns it (JSON form).

    ``config["parameters"]`` maps each metadata key to ``{"string_value": ...}``.
    """
    parameters = config.get("parameters") or {}
    props = {key: value.get("string_value", "") for key, value in parameters.items() if isinstance(value, dict)}
    metadata = ModelMetadata.from_props(props, source=source)
    metadata.check_preprocessing(source)
    return metadata


def make_request(httpclient: Any, feeds: dict[str, np.ndarray]) -> tuple[list, list]:
    """Triton ``InferInput`` s (FP32, binary) for ``feeds`` and ``InferRequestedOutput`` s for the outputs."""
    inputs = []
    for name in INPUT_NAMES:
        array = feeds[name]
        tensor = httpclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in OUTPUT_NAMES]
    return inputs, outputs


class TritonEngine(Engine):
    """A model served by Triton, over HTTP.

    Args:
        url: ``host:port`` of the server's HTTP endpoint (default port 8000).
        model_name: The model's name in the server's repository.
        timeout_s: Connection and network timeout.

    Raises:
        EngineError: tritonclient missing, server unreachable or not live, model not ready.
        ModelMismatchError: The served model's config has no AFNet-M metadata or other
            preprocessing.
    """

    backend = "triton"

    def __init__(self, url: str, model_name: str, timeout_s: float = 10.0) -> None:
        httpclient = import_triton_http()
        from tritonclient.utils import InferenceServerException

        self._http = httpclient
        self._server_error = InferenceServerException
        self._url = parse_url(url)
        self._model = model_name
        self._client = httpclient.InferenceServerClient(
            url=self._url, connection_timeout=timeout_s, network_timeout=timeout_s
        )
        try:
            metadata = metadata_from_triton_config(self._model_config(), f"triton://{self._url}/{model_name}")
        except (EngineError, ModelMismatchError):
            self._client.close()
            raise
        super().__init__(metadata, max_batch=self._max_batch_size)

    def _model_config(self) -> dict:
        """Check the server and model are up; return the model's config (JSON form)."""
        try:
            if not self._client.is_server_live():
                raise EngineError(f"Triton server at {self._url} is not live")
            if not self._client.is_model_ready(self._model):
                raise EngineError(
                    f"Triton server at {self._url}: model {self._model!r} is not ready (not in its repository?)"
                )
            config = self._client.get_model_config(self._model)
        except OSError as exc:
            raise EngineError(f"Triton server at {self._url} is unreachable ({_one_line(exc)})") from None
        except self._server_error as exc:
            raise EngineError(f"Triton server at {self._url} refused the request ({_one_line(exc)})") from None
        self._max_batch_size = int(config.get("max_batch_size") or 0) or None
        return config

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs, outputs = make_request(self._http, feeds)
        try:
            result = self._client.infer(self._model, inputs, outputs=outputs)
        except (OSError, self._server_error) as exc:
            raise EngineError(f"Triton server at {self._url}: inference failed ({_one_line(exc)})") from None
        return {name: result.as_numpy(name) for name in OUTPUT_NAMES}

    def close(self) -> None:
        if not self._closed:
            self._client.close()
        super().close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__

"""A disk cache of TensorRT plans, safe against stale entries, crashes and concurrent builders.

An entry is ``ROOT/<digest>.plan`` plus its sidecar ``ROOT/<digest>.plan.json``. The digest
hashes an :class:`EngineKey`: sha256 of the ONNX bytes, TensorRT version, GPU name, compute
capability, precision and the batch profile, so a change in any of them names another entry.
The sidecar holds the full key, the plan's sha256 and size, and caller info (the model's
metadata props, which the runtime needs because a plan carries none).

Rules:
- Only a plan whose sidecar holds exactly the requested key and whose bytes hash to the
  recorded sha256 is loaded; anything else (a foreign or stale entry, a plan without sidecar,
  a truncated plan) is rebuilt, never loaded.
- Files are written to a temporary name and renamed into place (atomic on POSIX); the sidecar
  is written last, so it marks a complete entry.
- Builders of one key take ``fcntl.flock`` on ``ROOT/<digest>.lock`` and look again after the
  lock is theirs, so two processes asking for the same key build it once. The lock dies with
  its process, so a crashed builder never blocks the next one.
- The TensorRT timing cache (per TensorRT version and GPU, shared by all models) is handed to
  each build and the updated one saved; concurrent builds of different keys: the last save wins.

The same sidecar format sits next to a plan that ``export/build_engine.py -o`` writes.
This module uses the standard library only: the runtime imports it without TensorRT or torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
CACHE_ENV = "AFNET_ENGINE_CACHE"


class CacheError(RuntimeError):
    """A plan or sidecar cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class BuildEnvironment:
    """What a TensorRT plan is tied to besides the model: it runs only where these match."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "8.9"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (sm {self.compute_capability})"


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on."""

    onnx_sha256: str
    environment: BuildEnvironment
    precision: str  # fp32 | fp16 | int8
    profile: tuple[int, int, int]  # batch sizes: min, opt, max

    def digest(self) -> str:
        """Short stable name of the key (hex)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["profile"] = list(self.profile)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "EngineKey":
        """Parse a key; raises KeyError/TypeError/ValueError on a malformed dict."""
        return cls(
            onnx_sha256=str(data["onnx_sha256"]),
            environment=BuildEnvironment(**data["environment"]),
            precision=str(data["precision"]),
            profile=tuple(int(b) for b in data["profile"]),
        )


@dataclass(frozen=True)
class BuildOutput:
    """What a builder returns: the serialized plan and, if it has one, the updated timing cache."""

    plan: bytes
    timing_cache: bytes | None = None


@dataclass(frozen=True)
class PlanFile:
    """A plan on disk with its verified sidecar."""

    plan_path: Path
    key: EngineKey
    info: dict  # caller info stored with the plan (e.g. {"metadata": ModelMetadata props})
    built: bool = False  # True when this call built it


Builder = Callable[[bytes | None], BuildOutput]
"""Builds a plan; receives the saved timing cache (or None)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_path(plan_path: str | Path) -> Path:
    """The sidecar of a plan: ``model.plan`` -> ``model.plan.json``."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def default_cache_dir() -> Path:
    """``$AFNET_ENGINE_CACHE``, else ``~/.cache/afnet-realtime/engines``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "afnet-realtime" / "engines")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # only left behind if writing failed


def write_plan(plan_path: str | Path, plan: bytes, key: EngineKey, info: dict) -> None:
    """Write a plan and then its sidecar (the sidecar last: it marks the pair complete)."""
    plan_path = Path(plan_path)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "digest": key.digest(),
        "key": key.to_dict(),
        "plan_sha256": sha256_bytes(plan),
        "plan_size": len(plan),
        "info": info,
    }
    atomic_write(plan_path, plan)
    atomic_write(sidecar_path(plan_path), json.dumps(sidecar, indent=2, sort_keys=True).encode())


def read_plan(plan_path: str | Path, expected_key: EngineKey | None = None) -> tuple[bytes, PlanFile]:
    """Read a plan and check it against its sidecar.

    Args:
        plan_path: The ``.plan`` file.
        expected_key: If given, the sidecar must hold exactly this key.

    Returns:
        The plan bytes and the :class:`PlanFile`.

    Raises:
        CacheError: Plan or sidecar missing or unreadable, the plan's bytes do not match the
            sidecar's sha256 (truncated or replaced), or the key differs from ``expected_key``.
    """
    plan_path = Path(plan_path)
    side = sidecar_path(plan_path)
    try:
        plan = plan_path.read_bytes()
    except OSError as exc:
        raise CacheError(f"{plan_path}: cannot read the plan ({exc.strerror or exc})") from None
    try:
        data = json.loads(side.read_text())
        key = EngineKey.from_dict(data["key"])
        recorded_sha, info = data["plan_sha256"], data["info"]
    except OSError as exc:
        raise CacheError(f"{side}: no readable plan sidecar ({exc.strerror or exc}); rebuild the plan") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{side}: malformed plan sidecar ({type(exc).__name__}: {exc})") from None
    if sha256_bytes(plan) != recorded_sha:
        raise CacheError(f"{plan_path}: plan bytes do not match its sidecar (truncated or replaced)")
    if expected_key is not None and key != expected_key:
        raise CacheError(f"{plan_path}: plan was built for another key ({key.digest()} != {expected_key.digest()})")
    return plan, PlanFile(plan_path, key, info)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed); released on exit or process death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class EngineCache:
    """Plans keyed by :class:`EngineKey` under one directory.

    Args:
        root: Cache directory (created on demand); default :func:`default_cache_dir`.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def plan_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.digest()}.plan"

    def timing_cache_path(self, environment: BuildEnvironment) -> Path:
        name = hashlib.sha256(json.dumps(asdict(environment), sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"timing-{name}.cache"

    def lookup(self, key: EngineKey) -> PlanFile | None:
        """The verified entry for ``key``, or None (absent, foreign, stale or damaged: logged)."""
        found = self._load(key)
        return found[1] if found is not None else None

    def _load(self, key: EngineKey) -> tuple[bytes, PlanFile] | None:
        path = self.plan_path(key)
        if not path.exists() and not sidecar_path(path).exists():
            return None
        try:
            return read_plan(path, expected_key=key)
        except CacheError as exc:
            log.warning("engine cache: ignoring entry: %s", exc)
            return None

    def get_or_build(self, key: EngineKey, build: Builder, info: dict) -> tuple[bytes, PlanFile]:
        """The plan for ``key`` and its entry, built (once across processes) if needed.

        The plan is read and verified once: callers load the returned bytes, not the file.

        Args:
            key: What the plan must match.
            build: Called with the saved timing cache (or None) under the key's lock.
            info: JSON-serialisable caller info stored in the sidecar.
        """
        found = self._load(key)
        if found is not None:
            return found
        with file_lock(self.root / f"{key.digest()}.lock"):
            found = self._load(key)  # another process may have built it while we waited
            if found is not None:
                return found
            timing_path = self.timing_cache_path(key.environment)
            timing = timing_path.read_bytes() if timing_path.exists() else None
            output = build(timing)
            if not output.plan:
                raise CacheError(f"builder returned an empty plan for {key.digest()}")
            write_plan(self.plan_path(key), output.plan, key, info)
            if output.timing_cache:
                atomic_write(timing_path, output.timing_cache)
        log.info("engine cache: built %s (%s, %s)", self.plan_path(key), key.precision, key.environment.describe())
        return output.plan, PlanFile(self.plan_path(key), key, info, built=True)

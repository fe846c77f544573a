"""Hold back the start-up chatter that MediaPipe's C++ code writes straight to stderr.

MediaPipe 0.10.21 prints a handful of lines while its graph starts and when it first tracks a
face ("Created TensorFlow Lite XNNPACK delegate", absl's "All log messages before
absl::InitializeLog()", ``W0000 ... inference_feedback_manager`` / ``landmark_projection_calculator``).
They come from C++ through file descriptor 2, so neither ``logging`` nor environment variables
(GLOG_minloglevel, TF_CPP_MIN_LOG_LEVEL: tried, ignored) reach them. Inside
:func:`quiet_native_stderr`, fd 2 goes to a temporary file; afterwards every line that is not
known chatter is written back to the real stderr, so nothing else is lost, only delayed.

Usage:
    with quiet_native_stderr():
        mesh = mp.solutions.face_mesh.FaceMesh(...)
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

CHATTER = re.compile(
    r"^(INFO: Created TensorFlow Lite XNNPACK delegate"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|W0000 [\d:. ]+\d+ (inference_feedback_manager|landmark_projection_calculator)\.cc:\d+\] )"
)
"""Lines known to be harmless MediaPipe start-up output."""


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Route fd 2 to a temporary file for the block; replay what is not :data:`CHATTER`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if not CHATTER.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
            if len(kept) < len(lines):
                log.debug("held back %d lines of MediaPipe start-up output", len(lines) - len(kept))

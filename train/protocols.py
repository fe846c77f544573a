"""Subject-independent cross-validation folds: BU-3DFE P1 / P2, Bosphorus, the synthetic set.

The literature's protocols (see the design notes, datasets.md):

- ``bu3dfe_p1``: 60 BU-3DFE subjects, intensities 03 and 04 of the six basic expressions
  (60 x 12 = 720 samples), 10 folds of 6 test subjects (54 train); repeated with a new random
  fold assignment each time. The 60 subjects are one FIXED subset for every repeat and seed.
- ``bu3dfe_p2``: the same, but the 60 subjects are drawn anew for each repeat.
- ``bosphorus``: 60 of the subjects that have all six basic emotions (one sample each,
  360 samples), 10 subject-independent folds, repeated like P1 (fixed subset).
- ``synthetic``: every record and every subject (identities of a generated set), k folds.

The literature's list of 60 subjects is not public. The fixed subset here ranks every subject
id by ``sha256(f"{SUBSET_SEED}:{id}")`` and takes the 60 eligible ids that rank first: a
seeded shuffle that anyone can reproduce, that, unlike "the first 60" (F0001..F0056 +
M0001..M0004 on BU-3DFE), is not almost all female, and that stays put when some other
subject's files are missing (one missing chosen subject is replaced by the next in rank; the
other 59 stay). Eligible subjects are derived from the records present:
a subject qualifies only if it has every sample the protocol needs (for Bosphorus this
replaces the unverified 65-subject list). Where a subject has several files for one sample
(Bosphorus takes ``_0``, ``_1``), the lowest take is used, so each subject gives exactly
12 (BU-3DFE) or 6 (Bosphorus) samples.

Small sets degrade: fewer eligible subjects than 60 -> all of them, with a
:class:`ProtocolWarning`; fewer subjects than folds -> one fold per subject (leave one
subject out), with a warning; fewer than 2 subjects -> ``ValueError`` (no subject-independent
split exists).
"""

from __future__ import annotations

import hashlib
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from realtime.spec import BASIC_SIX
from train.datasets.scan import ScanRecord

PROTOCOLS: tuple[str, ...] = ("bu3dfe_p1", "bu3dfe_p2", "bosphorus", "synthetic")
PROTOCOL_SUBJECTS = 60
BU3DFE_INTENSITIES: tuple[int, ...] = (3, 4)
SUBSET_SEED = 2006  # the fixed P1 / Bosphorus subject subset; never change it (results would move)


class ProtocolWarning(UserWarning):
    """The records present cannot give the protocol's full size; a smaller split is used."""


@dataclass(frozen=True)
class Fold:
    """One train/test split of one repeat; indices point into the records given to make_folds."""

    train_idx: np.ndarray  # (n_train,) int64, sorted
    test_idx: np.ndarray  # (n_test,) int64, sorted
    repeat: int
    fold: int
    test_subjects: tuple[str, ...]


def eligible_samples(records: Sequence[ScanRecord], protocol: str) -> dict[str, list[int]]:
    """Subject -> indices of its protocol samples, for the subjects that have all of them.

    Raises:
        ValueError: Unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "synthetic":
        samples: dict[str, list[int]] = defaultdict(list)
        for i, record in enumerate(records):
            samples[record.subject].append(i)
        return dict(samples)
    if protocol == "bosphorus":
        needed = {(e, None) for e in BASIC_SIX}
        dataset = "bosphorus"
    else:
        needed = {(e, i) for e in BASIC_SIX for i in BU3DFE_INTENSITIES}
        dataset = "bu3dfe"
    first: dict[tuple[str, str, int | None], int] = {}  # (subject, expression, intensity) -> index
    order = sorted(range(len(records)), key=lambda i: (records[i].take, str(records[i].path)))
    for i in order:
        r = records[i]
        key = (r.expression, r.intensity if dataset == "bu3dfe" else None)
        if r.dataset == dataset and key in needed:
            first.setdefault((r.subject, *key), i)
    samples = defaultdict(list)
    for (subject, *_), i in first.items():
        samples[subject].append(i)
    return {s: sorted(idx) for s, idx in samples.items() if len(idx) == len(needed)}


def make_folds(
    records: Sequence[ScanRecord], protocol: str, folds: int = 10, repeat: int = 0, seed: int = 0
) -> list[Fold]:
    """The subject-independent folds of one repeat of a protocol.

    Args:
        records: Samples (e.g. ``index_bu3dfe(root).records``); any that the protocol does
            not use are left out of every fold.
        protocol: One of :data:`PROTOCOLS`.
        folds: Number of folds (10 in the literature).
        repeat: Which repetition: its fold assignment (and P2's subject draw) is seeded by
            ``(seed, repeat)``.
        seed: Experiment seed.

    Returns:
        ``folds`` folds (fewer on a small set, see the module docstring); every selected
        sample is in exactly one fold's ``test_idx``; no subject is in train and test.

    Raises:
        ValueError: Unknown protocol, ``folds`` < 2, or fewer than 2 eligible subjects.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    samples = eligible_samples(records, protocol)
    subjects = sorted(samples)
    if len(subjects) < 2:
        raise ValueError(
            f"protocol {protocol!r}: {len(subjects)} eligible subject(s); a subject-independent split needs 2")
    rng = np.random.default_rng([seed, repeat])
    if protocol != "synthetic":
        if len(subjects) < PROTOCOL_SUBJECTS:
            warnings.warn(
                f"protocol {protocol!r}: only {len(subjects)} eligible subjects, using all (the protocol uses "
                f"{PROTOCOL_SUBJECTS})", ProtocolWarning, stacklevel=2)
        else:
            if protocol == "bu3dfe_p2":
                subjects = sorted(rng.choice(subjects, PROTOCOL_SUBJECTS, replace=False).tolist())
            else:
                subjects = sorted(sorted(subjects, key=_subset_rank)[:PROTOCOL_SUBJECTS])
    if len(subjects) < folds:
        warnings.warn(f"protocol {protocol!r}: {len(subjects)} subjects for {folds} folds, using "
                      f"{len(subjects)} folds (leave one subject out)", ProtocolWarning, stacklevel=2)
        folds = len(subjects)
    groups = np.array_split(rng.permutation(subjects), folds)
    result = []
    for k, test in enumerate(groups):
        test_set = set(test.tolist())
        test_idx = [i for s in test_set for i in samples[s]]
        train_idx = [i for s in subjects if s not in test_set for i in samples[s]]
        result.append(Fold(np.array(sorted(train_idx), dtype=np.int64), np.array(sorted(test_idx), dtype=np.int64),
                           repeat, k, tuple(sorted(test_set))))
    return result


def _subset_rank(subject: str) -> str:
    """A subject's place in the fixed subset order (a hash: independent of which others exist)."""
    return hashlib.sha256(f"{SUBSET_SEED}:{subject}".encode()).hexdigest()

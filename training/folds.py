"""Patient-level data splits: held-out test set, K-fold, repeated K-fold, repeated random splits.

Every split works on *patients*, never on samples: all samples (slices,
vertebrae, hips, images) of one patient land on the same side of every split,
so a model is never validated or tested on a patient it was trained on.  Splits
are deterministic functions of the seed (numpy ``default_rng``).  When a
stratification label is given, the patients of each stratum are dealt to the
folds in turn, so every fold gets the same class mix (a patient's stratum is
the most frequent label among its samples).

The papers' schemes:

* Kang et al. (seed 000): 20 % of the training patients as validation, repeated
  10 times -> ``mode="shuffle"``, ``n_splits=10``, ``val_fraction=0.2``; the
  10 models form the ensemble.
* Yoshida et al. (002), Gu et al. (004): test set held out, 5-fold CV on the rest
  -> ``mode="kfold"``, ``k=5``.
* Nissinen et al. (003): stratified 10-fold CV repeated 100 times ->
  ``mode="kfold"``, ``k=10``, ``repeats=100``, ``strata=labels``.
* Ha et al. (001): 80/20 train/validation -> ``mode="shuffle"``, ``n_splits=1``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["Fold", "SplitPlan", "make_splits", "patient_kfold", "repeated_patient_kfold",
           "shuffle_splits", "train_test_split_patients"]


@dataclass(frozen=True)
class Fold:
    """One training run: sample indices for training and validation.

    Attributes
    ----------
    index : int
        Fold number within its repeat (0-based).
    repeat : int
        Repeat number (0-based).
    train, val : numpy.ndarray
        Sorted sample indices into the data set the split was made on.
    """

    index: int
    repeat: int
    train: np.ndarray
    val: np.ndarray

    @property
    def name(self) -> str:
        """``"r00-f03"``: stable name for checkpoints and logs."""
        return f"r{self.repeat:02d}-f{self.index:02d}"


@dataclass(frozen=True)
class SplitPlan:
    """A held-out test set and the training folds on the rest.

    Attributes
    ----------
    test : numpy.ndarray
        Sample indices of the held-out test set (may be empty).
    folds : list of Fold
        Indices into the *full* data set (the test set excluded).
    excluded : numpy.ndarray
        Sample indices in neither (e.g. a held-out scanner profile).
    """

    test: np.ndarray
    folds: list[Fold]
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        """Sizes of the plan (for a model card)."""
        return {
            "test_samples": int(self.test.size),
            "excluded_samples": int(self.excluded.size),
            "folds": [{"name": f.name, "train": int(f.train.size), "val": int(f.val.size)} for f in self.folds],
        }


def _patients(patient_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray([str(p) for p in patient_ids])
    if ids.size == 0:
        raise ValueError("cannot split an empty data set")
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq, inverse


def _patient_strata(inverse: np.ndarray, n_patients: int, strata: Sequence[Any] | None) -> np.ndarray:
    if strata is None:
        return np.zeros(n_patients, dtype=np.int64)
    s = np.asarray([str(x) for x in strata])
    if s.size != inverse.size:
        raise ValueError(f"got {s.size} stratification labels for {inverse.size} samples")
    labels = np.empty(n_patients, dtype=object)
    for p in range(n_patients):
        labels[p] = Counter(s[inverse == p].tolist()).most_common(1)[0][0]
    _, codes = np.unique(labels.astype(str), return_inverse=True)
    return codes


def _shuffled_strata(rng: np.random.Generator, pstrata: np.ndarray, candidates: np.ndarray) -> list[np.ndarray]:
    out = []
    for s in np.unique(pstrata[candidates]):
        members = candidates[pstrata[candidates] == s]
        out.append(rng.permutation(members))
    return out


def _samples(inverse: np.ndarray, patient_mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(patient_mask[inverse]).astype(np.int64)


def train_test_split_patients(
    patient_ids: Sequence[Any],
    test_fraction: float,
    seed: int,
    strata: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``test_fraction`` of the patients (per stratum) as a test set.

    Parameters
    ----------
    patient_ids : sequence
        Patient of each sample.
    test_fraction : float
        Fraction of patients in the test set, in [0, 1).
    seed : int
        Random seed.
    strata : sequence, optional
        Per-sample label to stratify on.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Sorted sample indices of the rest and of the test set.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1) (got {test_fraction})")
    uniq, inverse = _patients(patient_ids)
    pstrata = _patient_strata(inverse, len(uniq), strata)
    rng = np.random.default_rng([int(seed), 7919])
    is_test = np.zeros(len(uniq), dtype=bool)
    for patients in _shuffled_strata(rng, pstrata, np.arange(len(uniq))):
        n_test = int(round(test_fraction * len(patients)))
        is_test[patients[:n_test]] = True
    if test_fraction > 0 and not is_test.any():
        is_test[rng.integers(len(uniq))] = True
    if is_test.all():
        raise ValueError("the test set would take every patient; lower test_fraction or add patients")
    return _samples(inverse, ~is_test), _samples(inverse, is_test)


def patient_kfold(
    patient_ids: Sequence[Any],
    k: int,
    seed: int,
    strata: Sequence[Any] | None = None,
    *,
    repeat: int = 0,
    candidates: np.ndarray | None = None,
) -> list[Fold]:
    """Patient-level (stratified) K-fold: every patient is validated exactly once.

    Parameters
    ----------
    patient_ids : sequence
        Patient of each sample.
    k : int
        Number of folds (>= 2, at most the number of patients).
    seed : int
        Random seed; ``repeat`` is mixed in so repeats differ.
    strata : sequence, optional
        Per-sample label to stratify on.
    repeat : int
        Repeat number (see :func:`repeated_patient_kfold`).
    candidates : numpy.ndarray, optional
        Sample indices to split (default all); the others are in no fold.

    Returns
    -------
    list of Fold
        ``k`` folds with sample indices into ``patient_ids``.
    """
    uniq, inverse = _patients(patient_ids)
    in_play = np.zeros(len(uniq), dtype=bool)
    in_play[np.unique(inverse if candidates is None else inverse[np.asarray(candidates, dtype=np.int64)])] = True
    n = int(in_play.sum())
    if not 2 <= k <= n:
        raise ValueError(f"k-fold needs 2 <= k <= number of patients ({n}); got k={k}")
    pstrata = _patient_strata(inverse, len(uniq), strata)
    rng = np.random.default_rng([int(seed), int(repeat), 104729])
    groups_full = np.full(len(uniq), -1, dtype=np.int64)
    players = np.flatnonzero(in_play)
    order = _shuffled_strata(rng, pstrata, players)
    start = int(rng.integers(k))
    i = start
    for patients in order:
        for p in patients:
            groups_full[p] = i % k
            i += 1
    folds = []
    for f in range(k):
        val_mask = groups_full == f
        train_mask = in_play & ~val_mask
        folds.append(Fold(f, repeat, _samples(inverse, train_mask), _samples(inverse, val_mask)))
    return folds


def repeated_patient_kfold(
    patient_ids: Sequence[Any],
    k: int,
    repeats: int,
    seed: int,
    strata: Sequence[Any] | None = None,
    *,
    candidates: np.ndarray | None = None,
) -> list[Fold]:
    """``repeats`` independent patient-level K-fold partitions (Nissinen et al.), ``k * repeats`` folds."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    out: list[Fold] = []
    for r in range(repeats):
        out += patient_kfold(patient_ids, k, seed, strata, repeat=r, candidates=candidates)
    return out


def shuffle_splits(
    patient_ids: Sequence[Any],
    n_splits: int,
    val_fraction: float,
    seed: int,
    strata: Sequence[Any] | None = None,
    *,
    candidates: np.ndarray | None = None,
) -> list[Fold]:
    """``n_splits`` independent random patient-level train/validation splits (Kang et al.).

    Parameters
    ----------
    patient_ids : sequence
        Patient of each sample.
    n_splits : int
        Number of splits (models in the ensemble).
    val_fraction : float
        Fraction of patients (per stratum) in each validation set, in (0, 1).
    seed : int
        Random seed.
    strata : sequence, optional
        Per-sample label to stratify on.
    candidates : numpy.ndarray, optional
        Sample indices to split (default all).

    Returns
    -------
    list of Fold
        ``Fold(index=i, repeat=0, ...)`` for each split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1 (got {n_splits})")
    uniq, inverse = _patients(patient_ids)
    in_play = np.zeros(len(uniq), dtype=bool)
    in_play[np.unique(inverse if candidates is None else inverse[np.asarray(candidates, dtype=np.int64)])] = True
    if in_play.sum() < 2:
        raise ValueError("a train/validation split needs at least 2 patients")
    pstrata = _patient_strata(inverse, len(uniq), strata)
    out = []
    for i in range(n_splits):
        rng = np.random.default_rng([int(seed), i, 15485863])
        val = np.zeros(len(uniq), dtype=bool)
        for patients in _shuffled_strata(rng, pstrata, np.flatnonzero(in_play)):
            val[patients[: int(round(val_fraction * len(patients)))]] = True
        if not val.any():
            val[rng.choice(np.flatnonzero(in_play))] = True
        if (in_play & ~val).sum() == 0:
            raise ValueError("validation would take every patient; lower val_fraction")
        out.append(Fold(i, 0, _samples(inverse, in_play & ~val), _samples(inverse, val)))
    return out


def make_splits(
    patient_ids: Sequence[Any],
    *,
    mode: str = "kfold",
    folds: int = 5,
    repeats: int = 1,
    val_fraction: float = 0.2,
    test_fraction: float = 0.15,
    seed: int = 0,
    strata: Sequence[Any] | None = None,
    exclude: np.ndarray | None = None,
) -> SplitPlan:
    """Held-out test patients plus the training folds on the remaining patients.

    Parameters
    ----------
    patient_ids : sequence
        Patient of each sample.
    mode : {"kfold", "shuffle"}
        ``kfold``: (repeated) K-fold; ``shuffle``: ``folds`` random splits with
        ``val_fraction`` validation patients each.
    folds, repeats, val_fraction, test_fraction, seed, strata
        See :func:`repeated_patient_kfold`, :func:`shuffle_splits`,
        :func:`train_test_split_patients`.
    exclude : numpy.ndarray, optional
        Boolean mask or indices of samples kept out of every split (e.g. a
        scanner profile held out for a robustness test); their patients must
        not also have included samples.

    Returns
    -------
    SplitPlan
    """
    ids = np.asarray([str(p) for p in patient_ids])
    excluded_mask = np.zeros(ids.size, dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype == bool:
            if ex.size != ids.size:
                raise ValueError(f"exclude mask has {ex.size} entries for {ids.size} samples")
            excluded_mask = ex.copy()
        else:
            excluded_mask[ex.astype(np.int64)] = True
    shared = set(ids[excluded_mask]) & set(ids[~excluded_mask])
    if shared:
        raise ValueError(f"{len(shared)} patient(s) have both excluded and included samples (e.g. {sorted(shared)[0]!r})")
    keep = np.flatnonzero(~excluded_mask)
    if keep.size == 0:
        raise ValueError("every sample is excluded; nothing to train on")
    sub_strata = None if strata is None else np.asarray([str(s) for s in strata])[keep]
    rest_local, test_local = train_test_split_patients(ids[keep], test_fraction, seed, sub_strata)
    rest, test = keep[rest_local], keep[test_local]
    if mode == "kfold":
        fl = repeated_patient_kfold(ids, folds, repeats, seed, strata, candidates=rest)
    elif mode == "shuffle":
        if repeats != 1:
            raise ValueError("mode='shuffle' draws `folds` independent splits; set repeats = 1")
        fl = shuffle_splits(ids, folds, val_fraction, seed, strata, candidates=rest)
    else:
        raise ValueError(f"split mode must be 'kfold' or 'shuffle' (got {mode!r})")
    return SplitPlan(test=test, folds=fl, excluded=np.flatnonzero(excluded_mask).astype(np.int64))

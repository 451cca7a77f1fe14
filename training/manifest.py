"""Site manifests: a hospital's own CT / radiograph + DXA pairs as a CSV file.

One row per imaging study (or per DICOM file, for radiographs) paired with a
DXA measurement.  Columns (header names exact, lower case; order free):

==================  ========  ==========================================================
column              required  meaning
==================  ========  ==========================================================
``patient_id``      yes       pseudonymous patient key (splits never separate a patient)
``dicom_path``      yes       DICOM file or folder; several separated by ``;``.  Relative
                              paths are relative to the manifest's folder
``bmd``             \\*        DXA areal BMD, g/cm^2 (0.1-2.5)
``t_score``         \\*        DXA T-score (-8..6)
``grade``           \\*        ``normal`` / ``osteopenia`` / ``osteoporosis`` (WHO); derived
                              from ``t_score`` when empty
``tbs``                       trabecular bone score (0.5-2.0)
``dxa_site``                  ``lumbar_spine`` / ``femoral_neck`` / ``total_hip`` / ...
``age``                       years (0-120)
``sex``                       ``M`` / ``F``
``height_cm``                 50-250
``weight_kg``                 10-400
``bmi``                       kg/m^2 (8-80); derived from height and weight when empty,
                              checked against them (10 %) when both are given
``laterality``                ``L`` / ``R`` (hip radiographs)
``scoliosis``                 0/1 (DXA spine images)
``unreliable``                0/1
``fracture``                  0/1
``days_between``              days between the imaging and the DXA (>= 0)
``profile``                   scanner profile / vendor label (held-out-scanner tests)
==================  ========  ==========================================================

\\* at least one of ``bmd``, ``t_score``, ``grade`` per row, and whatever the
protocol's builder asks for via ``require=``.  Errors name the file, the row
number as a spreadsheet shows it (header = row 1) and the column, and all of
them are reported at once.  Patient names, IDs or birth dates never appear in
logs: only the row number.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from screener.scores import who_grade

__all__ = ["COLUMNS", "Manifest", "ManifestError", "ManifestRow", "read_manifest"]

GRADES = ("normal", "osteopenia", "osteoporosis")
#: column kinds with a fixed set of values: (allowed values, normalisation of the cell text)
_CHOICES = {"grade": (GRADES, str.lower), "sex": (("M", "F"), str.upper),
            "lat": (("L", "R"), str.upper)}
#: column -> (kind, low, high)
COLUMNS: dict[str, tuple[str, float | None, float | None]] = {
    "patient_id": ("str", None, None),
    "dicom_path": ("paths", None, None),
    "bmd": ("float", 0.1, 2.5),
    "t_score": ("float", -8.0, 6.0),
    "grade": ("grade", None, None),
    "tbs": ("float", 0.5, 2.0),
    "dxa_site": ("str", None, None),
    "age": ("float", 0.0, 120.0),
    "sex": ("sex", None, None),
    "height_cm": ("float", 50.0, 250.0),
    "weight_kg": ("float", 10.0, 400.0),
    "bmi": ("float", 8.0, 80.0),
    "laterality": ("lat", None, None),
    "scoliosis": ("flag", None, None),
    "unreliable": ("flag", None, None),
    "fracture": ("flag", None, None),
    "days_between": ("float", 0.0, None),
    "profile": ("str", None, None),
}
REQUIRED = ("patient_id", "dicom_path")


class ManifestError(ValueError):
    """The manifest is invalid; the message lists every bad row and column."""


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row (missing optional values are None)."""

    row: int
    patient_id: str
    dicom_paths: tuple[Path, ...]
    bmd: float | None = None
    t_score: float | None = None
    grade: str | None = None
    tbs: float | None = None
    dxa_site: str | None = None
    age: float | None = None
    sex: str | None = None
    height_cm: float | None = None
    weight_kg: float | None = None
    bmi: float | None = None
    laterality: str | None = None
    scoliosis: int | None = None
    unreliable: int | None = None
    fracture: int | None = None
    days_between: float | None = None
    profile: str | None = None

    @property
    def grade_index(self) -> int | None:
        """0 normal, 1 osteopenia, 2 osteoporosis (None if unknown)."""
        return None if self.grade is None else GRADES.index(self.grade)

    def demographics(self) -> np.ndarray:
        """Ha et al.'s demographics vector (age, sex 1=M/0=F, height, weight, BMI); NaN where missing."""
        sex = {"M": 1.0, "F": 0.0}.get(self.sex or "", float("nan"))
        vals = [self.age, sex, self.height_cm, self.weight_kg, self.bmi]
        return np.array([float("nan") if v is None else float(v) for v in vals], dtype=np.float64)


@dataclass
class Manifest:
    """A validated site manifest.

    Attributes
    ----------
    path : pathlib.Path
    rows : list of ManifestRow
    columns : tuple of str
        Columns present in the file.
    """

    path: Path
    rows: list[ManifestRow] = field(default_factory=list)
    columns: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def patient_ids(self) -> np.ndarray:
        """Patient of each row."""
        return np.asarray([r.patient_id for r in self.rows])

    def column(self, name: str) -> np.ndarray:
        """Values of one column as a float array (NaN where missing); ``grade`` gives class indices."""
        if name == "grade":
            return np.asarray([np.nan if r.grade is None else r.grade_index for r in self.rows], dtype=np.float64)
        if name not in COLUMNS or COLUMNS[name][0] not in ("float", "flag"):
            raise ManifestError(f"column {name!r} is not numeric")
        return np.asarray([np.nan if getattr(r, name) is None else float(getattr(r, name)) for r in self.rows])


def _cell_value(col: str, text: str, base: Path, check_paths: bool) -> tuple[str, Any]:
    """``(key, value)`` of one non-empty manifest cell; ``ValueError`` says what is wrong with it."""
    kind, lo, hi = COLUMNS[col]
    if kind == "float":
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ValueError(f"{v:g} is outside the plausible range {rng}")
        return col, v
    if kind == "flag":
        if text not in ("0", "1"):
            raise ValueError(f"{text!r} must be 0 or 1")
        return col, int(text)
    if kind in _CHOICES:
        choices, normalise = _CHOICES[kind]
        value = normalise(text)
        if value not in choices:
            allowed = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
            raise ValueError(f"{text!r} must be {allowed}")
        return col, value
    if kind == "paths":
        parts = [s.strip() for s in text.split(";") if s.strip()]
        resolved = tuple((Path(s) if Path(s).is_absolute() else (base / s)) for s in parts)
        if check_paths:
            gone = [str(r) for r in resolved if not r.exists()]
            if gone:
                raise ValueError(f"{gone[0]} does not exist")
        return "dicom_paths", resolved
    return col, text


def _complete_row(vals: dict[str, Any]) -> tuple[str, str] | None:
    """Fill a row's derived values in place (grade from T-score, BMI from weight and height);
    ``(column, problem)`` when the row has no DXA value or contradicts itself."""
    if not ({"bmd", "t_score", "grade"} & set(vals)):
        return "bmd", "the row has no DXA value (bmd, t_score or grade)"
    if "t_score" in vals:
        grade = who_grade(vals["t_score"])
        if "grade" not in vals:
            vals["grade"] = grade
        elif vals["grade"] != grade:
            return "grade", f"{vals['grade']!r} contradicts t_score {vals['t_score']:g} (WHO: {grade})"
    if "height_cm" in vals and "weight_kg" in vals:
        derived = vals["weight_kg"] / (vals["height_cm"] / 100.0) ** 2
        if "bmi" not in vals:
            vals["bmi"] = round(derived, 2)
        elif abs(vals["bmi"] - derived) > 0.1 * derived:
            return "bmi", f"{vals['bmi']:g} disagrees with weight/height^2 = {derived:.1f}"
    return None


def read_manifest(
    path: str | Path,
    *,
    require: Sequence[str] = (),
    check_paths: bool = True,
    max_errors: int = 20,
) -> Manifest:
    """Parse and validate a site manifest CSV.

    Parameters
    ----------
    path : path
        The CSV (UTF-8, comma-separated, header row).
    require : sequence of str
        Columns that every row must fill for the protocol (e.g. ``("bmd",)``,
        ``("grade", "age", "sex", "height_cm", "weight_kg")``).
    check_paths : bool
        Check that every ``dicom_path`` exists.
    max_errors : int
        Stop collecting errors after this many.

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        Listing every problem as ``file row N column: what is wrong``.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest {p} not found")
    unknown_req = [c for c in require if c not in COLUMNS]
    if unknown_req:
        raise ManifestError(f"require= names unknown column(s) {unknown_req}; known: {', '.join(COLUMNS)}")
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise ManifestError(f"{p}: empty file (expected a header row)") from None
        body = list(reader)
    problems: list[str] = []
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise ManifestError(f"{p} row 1: unknown column(s) {unknown}; known columns: {', '.join(COLUMNS)}")
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        raise ManifestError(f"{p} row 1: duplicated column(s) {sorted(dupes)}")
    missing = [c for c in (*REQUIRED, *require) if c not in header]
    if missing:
        raise ManifestError(f"{p} row 1: missing column(s) {missing}")
    if not ({"bmd", "t_score", "grade"} & set(header)):
        raise ManifestError(f"{p} row 1: needs at least one DXA column: bmd, t_score or grade")

    rows: list[ManifestRow] = []
    seen: dict[tuple[str, tuple[str, ...]], int] = {}

    def bad(rownum: int, col: str, msg: str) -> None:
        problems.append(f"{p} row {rownum} column {col}: {msg}")

    for i, raw in enumerate(body, start=2):
        if len(problems) >= max_errors:
            break
        if not any(c.strip() for c in raw):
            continue  # blank line
        if len(raw) != len(header):
            bad(i, "*", f"has {len(raw)} fields, the header has {len(header)}")
            continue
        cells = {h: c.strip() for h, c in zip(header, raw)}
        vals: dict[str, Any] = {}
        ok = True
        for col, text in cells.items():
            if text == "":
                if (col in REQUIRED or col in require) and not (col == "grade" and cells.get("t_score")):
                    bad(i, col, "is empty but required")
                    ok = False
                continue
            try:
                key, value = _cell_value(col, text, p.parent, check_paths)
            except ValueError as exc:
                bad(i, col, str(exc))
                ok = False
                continue
            vals[key] = value
        if not ok:
            continue
        problem = _complete_row(vals)
        if problem is not None:
            bad(i, *problem)
            continue
        key = (vals["patient_id"], tuple(str(x) for x in vals["dicom_paths"]))
        if key in seen:
            bad(i, "dicom_path", f"same patient and path(s) as row {seen[key]}")
            continue
        seen[key] = i
        rows.append(ManifestRow(row=i, **vals))
    if problems:
        more = " (further errors not shown)" if len(problems) >= max_errors else ""
        raise ManifestError(f"{len(problems)} problem(s) in manifest {p}{more}:\n  " + "\n  ".join(problems))
    if not rows:
        raise ManifestError(f"{p}: no data rows")
    return Manifest(path=p, rows=rows, columns=tuple(header))


def write_manifest(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write a manifest CSV from dicts (for tests and for exporting a virtual cohort as a manifest)."""
    rows = list(rows)
    cols = list(columns) if columns is not None else [c for c in COLUMNS if any(c in r for r in rows)]
    bad = [c for c in cols if c not in COLUMNS]
    if bad:
        raise ManifestError(f"unknown column(s) {bad}")
    out = Path(path)
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    return out

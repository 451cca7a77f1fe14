"""Router: which registered protocols apply to a series, and why the others do not.

Generic gates come first and apply to every protocol: localizers / scouts
(ImageType LOCALIZER or SCOUT), DERIVED\\SECONDARY images and reformats
(MPR, MIP, curved, volume renderings) unless the protocol sets
``accepts_derived`` (DERIVED\\PRIMARY\\AXIAL reconstructions pass), files
of several series mixed together, missing UIDs. Then each protocol's own
:meth:`~screener.protocols.base.Protocol.accepts` decides from the headers.
Every registered protocol gets a decision with a reason, so a job record
always says why nothing ran. Protocols that compare with adult reference data
(``adults_only``, all of them today) decline a patient under 20
(:func:`patient_age_years`: PatientAge, else birth date and study date).
"""
from __future__ import annotations

import datetime
import re
from typing import Any, Iterable, Sequence

import structlog

from screener.protocols.base import Decision, Protocol
from screener.series import SeriesInfo

log = structlog.get_logger(__name__)

SCOUT_TYPES = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM")
#: ImageType values that mark reformats / renderings (HU or geometry not the acquisition's)
#: Youngest age (years) the adult reference data (T-scores, HU thresholds) apply to.
ADULT_AGE_YEARS = 20
UNDER_AGE_REASON = f"patient under {ADULT_AGE_YEARS}: adult reference data do not apply"
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
REFORMAT_TYPES = ("REFORMATTED", "MPR", "MIP", "MINIP", "PROJECTION IMAGE",
                  "VOLUME_RENDER", "VRT", "CURVED", "CPR", "3D", "SUBTRACTION")


class Router:
    """A registry of protocols and the routing decision for a series.

    Parameters
    ----------
    protocols : iterable of Protocol
        Registered protocols; names must be unique.

    Raises
    ------
    ValueError
        When two protocols share a name.
    """

    def __init__(self, protocols: Iterable[Protocol] = ()) -> None:
        self._protocols: dict[str, Protocol] = {}
        for p in protocols:
            self.register(p)

    def register(self, protocol: Protocol) -> None:
        """Add a protocol; its ``name`` must be new."""
        if protocol.name in self._protocols:
            raise ValueError(f"protocol {protocol.name!r} is already registered; "
                             "give each protocol a unique name")
        self._protocols[protocol.name] = protocol

    @property
    def protocols(self) -> list[Protocol]:
        """The registered protocols in registration order."""
        return list(self._protocols.values())

    def route(self, info: SeriesInfo) -> list[tuple[Protocol, Decision]]:
        """Decide for every registered protocol whether it applies to ``info``.

        Returns
        -------
        list of (Protocol, Decision)
            One entry per registered protocol, in registration order.
        """
        gate = generic_gate(info)
        age = patient_age_years(info.header) if info.header is not None else None
        out: list[tuple[Protocol, Decision]] = []
        for p in self._protocols.values():
            if gate is not None:
                d = gate
            elif p.adults_only and age is not None and age < ADULT_AGE_YEARS:
                d = Decision(False, UNDER_AGE_REASON)
            elif _is_derived(info) and not p.accepts_derived:
                d = Decision(False, "derived/secondary image (ImageType "
                                    f"{chr(92).join(info.image_type)}): only original "
                                    "acquisitions are analysed")
            else:
                try:
                    d = p.accepts(info)
                except Exception as exc:  # noqa: BLE001 - one bad protocol must not stop routing
                    log.exception("protocol accepts() raised", protocol=p.name)
                    d = Decision(False, f"accepts() failed: {type(exc).__name__}: {exc}")
            out.append((p, d))
        log.info("routed", series_uid=info.series_uid,
                 decisions=[(p.name, d.accepted, d.reason) for p, d in out])
        return out


def _is_derived(info: SeriesInfo) -> bool:
    """DERIVED\\SECONDARY images and reformats/renderings; DERIVED\\PRIMARY\\AXIAL
    reconstructions (common for thin axial recons) are not excluded."""
    it = info.image_type
    if not it:
        return False
    if it[0] == "DERIVED" and len(it) > 1 and it[1] == "SECONDARY":
        return True
    return any(t in it[1:] for t in REFORMAT_TYPES)


def _date(ds: Any, keyword: str) -> datetime.date | None:
    try:
        text = str(ds.get(keyword, "") or "").strip()
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8])) \
            if len(text) == 8 and text.isdigit() else None
    except (ValueError, TypeError):
        return None


def patient_age_years(ds: Any) -> float | None:
    """The patient's age (years) at the study, or ``None`` when the header does not say.

    ``PatientAge`` (``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``; ``000Y`` and other zero ages are
    anonymisation placeholders and count as not stated), else whole years between
    ``PatientBirthDate`` and ``StudyDate`` (or ``SeriesDate`` / ``AcquisitionDate``).
    Malformed values count as not stated.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A header of the series.

    Returns
    -------
    float or None
    """
    try:
        m = _AGE.match(str(ds.get("PatientAge", "") or "").strip().upper())
    except Exception:  # noqa: BLE001 - an unreadable age is not stated
        m = None
    if m and int(m.group(1)) > 0:
        return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)]
    birth = _date(ds, "PatientBirthDate")
    study = next((d for d in (_date(ds, k) for k in ("StudyDate", "SeriesDate", "AcquisitionDate"))
                  if d is not None), None)
    if birth is None or study is None or study < birth:
        return None
    return float(study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day)))


def generic_gate(info: SeriesInfo) -> Decision | None:
    """A refusal that applies to every protocol, or ``None``."""
    if info.mixed_series:
        return Decision(False, "files of more than one series were given as one series")
    if not info.series_uid or not info.study_uid:
        return Decision(False, "StudyInstanceUID or SeriesInstanceUID missing: results could "
                               "not be linked to the study")
    if any(t in info.image_type for t in SCOUT_TYPES):
        return Decision(False, f"localizer/scout image (ImageType {chr(92).join(info.image_type)})")
    return None


def summarize(decisions: Sequence[tuple[str, bool, str]]) -> str:
    """``"name: reason; name: reason"`` of the refused protocols."""
    return "; ".join(f"{n}: {r}" for n, a, r in decisions if not a)

"""The protocol interface every analysis (classical or deep-learning) implements.

A protocol is cheap to ask and expensive to run:

* :meth:`Protocol.accepts` looks at headers only (:class:`~screener.series.SeriesInfo`)
  and returns a :class:`Decision` with a reason either way;
* :meth:`Protocol.run` gets the loaded :class:`~screener.domain.Volume` and a
  :class:`ProtocolContext` and returns findings, or raises
  :class:`ProtocolDeclined` when, after looking at the pixels, it cannot
  measure (e.g. ``"L1 not in view"``) -- a first-class outcome, not an error.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from screener.config import Config
    from screener.domain import Volume
    from screener.findings import Finding
    from screener.series import SeriesInfo


@dataclass(frozen=True)
class Decision:
    """Whether a protocol applies to a series, and why (or why not)."""

    accepted: bool
    reason: str

    def __bool__(self) -> bool:
        return self.accepted


class ProtocolDeclined(Exception):
    """Raised by :meth:`Protocol.run` when the protocol cannot measure this series.

    ``reason`` is recorded as the protocol's decision, e.g. ``"L1 not in view"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ProtocolContext:
    """What a protocol may need besides the volume."""

    config: "Config"
    info: "SeriesInfo"
    extras: dict[str, Any] = field(default_factory=dict)


class Protocol(ABC):
    """Base class of all protocols (see module docstring).

    Class attributes
    ----------------
    name : str
        Registry key, also the algorithm name in the SR.
    version : str
        Version of the protocol's code; the version written into every output is
        :meth:`algorithm_version` (for a model protocol, its bundle's).
    accepts_derived : bool
        Whether DERIVED / SECONDARY series reach :meth:`accepts` (default no).
    needs_volume : bool
        Whether :meth:`run` needs a :class:`~screener.domain.Volume` (CT
        protocols) or works from files (radiographs, later).
    adults_only : bool
        Whether the router declines patients under 20 (default yes: every
        protocol here compares with adult reference data).
    routing_order : int
        Where a built-in protocol stands in the registry (ascending): the order the
        router lists decisions and the reports list findings. Installed protocols
        come after the built-ins in name order whatever theirs.
    """

    name: str = "protocol"
    version: str = "0.0.0"
    accepts_derived: bool = False
    needs_volume: bool = True
    adults_only: bool = True
    routing_order: int = 1000

    @abstractmethod
    def accepts(self, info: "SeriesInfo") -> Decision:
        """Decide from headers alone whether this protocol applies."""

    @abstractmethod
    def run(self, volume: "Volume", context: ProtocolContext) -> list["Finding"]:
        """Measure; return findings or raise :class:`ProtocolDeclined`."""

    def algorithm_version(self, finding: "Finding") -> str:
        """The version of what produced ``finding``, as the SR and ``screener results`` state it.

        A classical protocol is its own algorithm: :attr:`version`.  Model protocols override
        this with the version of the model bundle that made the estimate.
        """
        return self.version


def axial_ct_decision(info: "SeriesInfo", *, min_slices: int = 10, max_thickness_mm: float = 6.0,
                      min_coverage_mm: float = 20.0,
                      excluded_body_parts: frozenset[str] = frozenset()) -> Decision:
    """Common header checks for protocols that need an axial CT volume.

    Every CT image storage class is accepted (classic CT, Enhanced CT,
    Legacy Converted Enhanced CT; :data:`screener.series.CT_IMAGE_STORAGE_CLASSES`);
    a multi-frame object's frames count as slices. Returns a refusing
    :class:`Decision` naming the first failed check, or an accepting one.
    """
    from screener.series import CT_IMAGE_STORAGE_CLASSES

    if info.modality != "CT":
        return Decision(False, f"modality {info.modality or 'missing'} is not CT")
    if info.sop_class_uid not in (*CT_IMAGE_STORAGE_CLASSES, ""):
        return Decision(False, f"SOP class {info.sop_class_uid} is not a CT image storage class "
                               "(CT, Enhanced CT or Legacy Converted Enhanced CT)")
    if info.orientation is None:
        return Decision(False, "no ImageOrientationPatient: geometry unknown")
    if not info.is_axial:
        return Decision(False, "not an axial series (slice normal > 10 degrees from patient z)")
    # slices = frames: a multi-frame object is judged by its frames like a classic series
    n_slices = max(info.n_frames, info.n_instances)
    if n_slices < min_slices:
        what = "frames" if info.is_multiframe else "slices"
        return Decision(False, f"only {n_slices} {what} (< {min_slices}): "
                               "not a volume (scout or key images?)")
    if info.slice_thickness is not None and info.slice_thickness > max_thickness_mm:
        return Decision(False, f"slice thickness {info.slice_thickness:g} mm > "
                               f"{max_thickness_mm:g} mm")
    # a multi-frame object without per-frame positions has no z range here; load_volume says why
    if (not info.is_multiframe or info.z_range_mm is not None) \
            and info.z_coverage_mm < min_coverage_mm:
        return Decision(False, f"z coverage {info.z_coverage_mm:.0f} mm < {min_coverage_mm:g} mm")
    if info.body_part and info.body_part in excluded_body_parts:
        return Decision(False, f"body part {info.body_part} cannot contain the lumbar spine")
    return Decision(True, "axial CT volume")

"""Base of the deep-learning protocols: a :class:`Protocol` backed by a model bundle.

The bundle lives in ``<config.models_dir>/<bundle_name>/`` (``screener train`` writes it,
the project ships ones trained on the virtual cohort).  It is loaded once per process and
device and kept; inference runs on the GPU when ``config.device`` is ``"auto"`` and CUDA is
available.  A missing bundle is a recorded decline with the command that makes one, not a
crash.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from screener.devices import resolve_device
from screener.protocols.base import Protocol, ProtocolContext, ProtocolDeclined

if TYPE_CHECKING:  # pragma: no cover
    from screener.bundles import Bundle
    from screener.domain import SpineLocalization, Volume
    from screener.findings import Finding, RoiGeometry

__all__ = ["ModelProtocol", "axial_rectangle_roi", "model_details", "nearest_slice", "spine_localization"]

_CACHE: dict[tuple[str, str], "Bundle"] = {}
_LOCK = threading.Lock()


class ModelProtocol(Protocol):
    """A protocol whose estimate comes from a bundle (see module docstring).

    Class attributes
    ----------------
    bundle_name : str
        Folder of the bundle under ``config.models_dir``.
    """

    bundle_name: str = ""

    def algorithm_version(self, finding: "Finding") -> str:
        """The version of the model bundle that produced ``finding`` (its manifest's ``version``,
        recorded by :func:`model_details`); the protocol's own version only when the finding
        does not name a bundle."""
        return str(finding.details.get("bundle_version") or self.version)

    def bundle_path(self, context: ProtocolContext) -> Path:
        """Where this protocol's bundle is expected."""
        return Path(context.config.models_dir) / (self.bundle_name or self.name)

    def load_bundle(self, context: ProtocolContext) -> "Bundle":
        """The loaded bundle (cached per path and device).

        Raises
        ------
        ProtocolDeclined
            When the bundle is not installed (the reason names the training command).
        """
        from screener.bundles import BundleError, load_bundle

        path = self.bundle_path(context)
        device = resolve_device(context.config.device)
        key = (str(path.resolve()), device)
        with _LOCK:
            if key in _CACHE:
                return _CACHE[key]
            if not (path / "model_card.json").is_file():
                raise ProtocolDeclined(
                    f"model bundle {path} not installed: run screener train "
                    f"training/recipes/{self.name}-cohort.toml --out {path.parent}")
            try:
                bundle = load_bundle(path, device)
            except BundleError as exc:
                raise ProtocolDeclined(f"model bundle {path} unusable: {exc}") from exc
            if bundle.protocol != self.name:
                raise ProtocolDeclined(f"model bundle {path} is for {bundle.protocol}, not {self.name}")
            _CACHE[key] = bundle
            return bundle


def spine_localization(volume: "Volume", context: ProtocolContext) -> "SpineLocalization":
    """Locate the spine once per series (cached in ``context.extras``) and return it."""
    found = context.extras.get("spine_localization")
    if found is None:
        from screener.localizer import locate_spine

        found = locate_spine(volume)
        context.extras["spine_localization"] = found
    return found


def nearest_slice(volume: "Volume", point_mm: Any) -> int:
    """Index of the slice of ``volume`` nearest a patient-mm point (clipped to the series)."""
    import numpy as np

    from screener.preprocess.sampling import VolumeSampler

    k = float(VolumeSampler(volume).to_index(np.asarray(point_mm, dtype=np.float64))[0])
    return int(np.clip(round(k), 0, volume.array.shape[0] - 1))


def axial_rectangle_roi(volume: "Volume", sampler: Any, corners_mm: Any, k: int,
                        centre_mm: tuple[float, float, float]) -> "RoiGeometry":
    """The SR region of a protocol's input drawn on axial slice ``k`` of the series.

    Parameters
    ----------
    volume : screener.domain.Volume
        The series.
    sampler : screener.preprocess.sampling.VolumeSampler
        Its sampler (patient mm -> voxel index).
    corners_mm : array_like, shape (4, 3)
        Corners of the region in patient mm, in drawing order, on slice ``k``.
    k : int
        Slice index the region is drawn on.
    centre_mm : tuple of float
        Centre of the region (patient mm), recorded with the ROI.

    Returns
    -------
    screener.findings.RoiGeometry
        Closed pixel polygon (column, row; clipped to the image), its area in mm^2 and the
        slice's SOP instance / class UIDs and frame number.
    """
    import numpy as np

    from screener.findings import RoiGeometry
    from screener.series import frame_number

    idx = sampler.to_index(np.asarray(corners_mm, dtype=float))
    rows, cols = volume.array.shape[1:]
    pts = np.stack([np.clip(idx[:, 2] + 0.5, 0.0, cols), np.clip(idx[:, 1] + 0.5, 0.0, rows)], axis=1)
    polygon = np.vstack([pts, pts[:1]])
    _, dj, di = volume.spacing
    xs, ys = pts[:, 0], pts[:, 1]
    area_px = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
    return RoiGeometry(source_sop_instance_uid=volume.sop_instance_uid(k), source_sop_class_uid=volume.sop_class_uid(k),
                       polygon=polygon, centre_mm=tuple(float(v) for v in centre_mm), area_mm2=area_px * dj * di,
                       slice_index=k, frame_number=frame_number(volume.datasets[k]) if volume.datasets else None)


def model_details(bundle: "Bundle") -> dict[str, Any]:
    """What a finding records about the model that produced it."""
    card = bundle.card
    return {"bundle_id": bundle.bundle_id, "bundle_version": bundle.version,
            "architecture": card.get("architecture", {}).get("name", ""),
            "ensemble_size": len(bundle.models),
            "training_data": str(card.get("training_data", "")),
            "device": str(bundle.device)}

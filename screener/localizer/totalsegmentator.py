"""Optional seam: a TotalSegmentator-based spine localizer.

A site that has the ``TotalSegmentator`` package and its weights can switch
the localizer with ``localizer = "totalsegmentator"``. The vertebra masks
(``vertebrae_T12``, ``vertebrae_L1``, ...) are converted into the same
:class:`~screener.domain.SpineLocalization` as the classical localizer, so
protocols and reports do not change. TotalSegmentator gives no level
confidence; a fixed 0.8 is reported, and its masks include the posterior
elements, so the centroid is that of the whole vertebra's body part in front
of the canal only approximately (known TotalSegmentator limits: transitional
vertebrae and level mix-ups, see ``../shared/reference/peers.md``).

Not exercised by the test-suite beyond the clear error when the package is
missing.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import structlog

from screener.domain import SpineLocalization, VertebraLocation, Volume

log = structlog.get_logger(__name__)

METHOD = "totalsegmentator"
_LABELS = [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
INSTALL_HINT = ("the 'totalsegmentator' spine localizer needs the TotalSegmentator package and its weights: "
                "pip install TotalSegmentator (it pulls torch and nnU-Net), then run "
                "'totalseg_download_weights -t total' once, or set localizer = \"classical\"")


class TotalSegmentatorLocalizer:
    """Spine localizer that runs TotalSegmentator's ``total`` task (vertebrae only)."""

    name = METHOD

    def __init__(self, fast: bool = True, device: str = "cpu") -> None:
        self.fast = fast
        self.device = device

    def locate(self, volume: Volume) -> SpineLocalization:
        """Segment the vertebrae with TotalSegmentator and convert the masks.

        Raises
        ------
        RuntimeError
            When TotalSegmentator (or nibabel) is not installed; the message says how to install it.
        """
        try:
            import nibabel as nib
            from totalsegmentator.python_api import totalsegmentator
        except ImportError as exc:
            raise RuntimeError(INSTALL_HINT) from exc
        affine = _ras_affine(volume)
        # NIfTI wants [i, j, k] order
        img = nib.Nifti1Image(np.transpose(volume.array, (2, 1, 0)).astype(np.float32), affine)
        rois = [f"vertebrae_{lab}" for lab in _LABELS]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "seg"
            totalsegmentator(img, out, fast=self.fast, roi_subset=rois, device=self.device, quiet=True)
            found: dict[str, VertebraLocation] = {}
            for lab in _LABELS:
                f = out / f"vertebrae_{lab}.nii.gz"
                if not f.exists():
                    continue
                mask = np.transpose(np.asarray(nib.load(str(f)).dataobj) > 0, (2, 1, 0))
                loc = _location(volume, mask, lab)
                if loc is not None:
                    found[lab] = loc
        reason = None if "L1" in found else "L1 not in view: TotalSegmentator found no complete L1"
        return SpineLocalization(found, METHOD, reason, {"levels": sorted(found)})


def _ras_affine(volume: Volume) -> np.ndarray:
    """NIfTI (RAS) affine of a volume indexed ``[i, j, k]``."""
    dk, dj, di = volume.spacing
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(volume.direction, float) @ np.diag([di, dj, dk])
    lps[:3, 3] = np.asarray(volume.origin, float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _location(volume: Volume, mask: np.ndarray, label: str) -> VertebraLocation | None:
    """Convert one vertebra mask (array order ``[k, j, i]``) to a :class:`VertebraLocation`."""
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    if ks.size == 0 or ks[0] == 0 or ks[-1] == mask.shape[0] - 1:
        return None  # touches the end of the coverage: not completely in view
    k, j, i = (float(c.mean()) for c in np.nonzero(mask))
    mm = volume.index_to_patient(k, j, i)
    z_a = float(volume.index_to_patient(ks[0], 0, 0)[2])
    z_b = float(volume.index_to_patient(ks[-1], 0, 0)[2])
    return VertebraLocation(label=label, slice_range=(int(ks[0]), int(ks[-1])), z_range_mm=(min(z_a, z_b), max(z_a, z_b)),
                            centroid_index=(k, j, i), centroid_mm=(float(mm[0]), float(mm[1]), float(mm[2])),
                            confidence=0.8)

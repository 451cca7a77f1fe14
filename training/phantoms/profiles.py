"""CT scanner / protocol profiles of the virtual cohort.

A profile fixes what varies between real acquisitions: vendor and model,
tube voltage (hence effective energy), reconstruction kernel (in-plane blur
and noise texture), noise level, slice thickness and spacing, pixel spacing
/ field of view, body coverage and contrast phase. ``HELD_OUT`` profiles are
never used for training splits: they stand for "a scanner the models have
not seen".

``LOCALIZER_PROFILES`` (``evaluation_only``, issue 14) are real-archive
acquisitions for cohort evaluations of the localizer, the L1 ROI and contrast
detection; they are in neither ``TRAINING_PROFILES`` nor ``HELD_OUT``, so no
existing training split changes:

* ``coarse_ap_native_3mm`` / ``coarse_ap_native_6mm``: abdomen-pelvis, native,
  120 kVp, soft kernel, 3 / 6 mm slices at 3 / 6 mm spacing, 170 x 170 matrix of
  ~2.94 mm pixels (FOV 500 mm), rendered with 3 x 3 in-plane supersampling so a
  pixel is the mean over its area (``supersample``).
* ``coarse_ap_pv_3mm_noagent``: the same at 3 mm, portal-venous, no contrast
  attribute in the header.
* ``chest_abd_arterial_noagent``: thorax to upper abdomen, arterial (aorta
  ~370 HU), 0.7 mm pixels, 2.5 mm slices, no contrast attribute.

``realism`` (issue 19, :data:`REALISM_PROFILES`, ``likeness``) is evaluation-only and in no
other list: a 120 kVp Siemens portal-venous abdomen-pelvis series at the real test CT's geometry
(3 mm every 2 mm, ~0.98 mm pixels) whose noise has a filtered-back-projection spectrum
(``noise_nps``), whose kernel blurs like the real Br38f, and whose fat, muscle and organs carry
texture (``tissue_texture``); 2 x 2 in-plane supersampling. Its new fields default to values that
leave every other profile's rendering byte-identical.

``contrast_in_header=False`` renders the phase's iodine but leaves
ContrastBolusAgent / Route out of the header and the phase out of the series
description (archives often lack them).

Noise figures are the standard deviation (HU) of water at the reference
5 mm slice for an average-sized patient (clinical-physics.md section 4:
abdomen, 5 mm, soft kernel ~8-15 HU); they scale as ``1/sqrt(thickness)``
and with patient size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

#: body coverage: (z_top, z_bottom) relative to landmarks, resolved by the renderer
COVERAGES: tuple[str, ...] = ("chest", "abdomen", "abdomen_pelvis", "lumbar_spine")
PHASE_AGENT = {"native": "", "arterial": "IOPAMIDOL 370", "portal_venous": "IOHEXOL 350"}


@dataclass(frozen=True)
class Kernel:
    """Reconstruction kernel: name on the header, blur (Gaussian sigma, mm) and noise correlation."""

    name: str
    sigma_mm: float
    noise_sigma_px: float
    noise_factor: float


@dataclass(frozen=True)
class ScannerProfile:
    """One acquisition protocol.

    Attributes
    ----------
    name : str
        Profile key.
    manufacturer, model : str
        Header values (Manufacturer, ManufacturerModelName).
    kvp : float
        Tube voltage; the effective energy follows :func:`physics.effective_energy`.
    kernel : Kernel
    noise_hu : float
        Water noise SD at 5 mm for an average patient with this kernel's ``noise_factor`` = 1.
    slice_thickness, slice_spacing : float
        mm (spacing < thickness = overlapping reconstruction).
    pixel_spacing : float
        mm (square pixels); ``rows = columns = matrix``.
    matrix : int
    coverage : str
        One of :data:`COVERAGES`.
    phase : str
        ``"native"``, ``"arterial"`` or ``"portal_venous"``.
    held_out : bool
        True for a scanner reserved for external testing.
    rescale_intercept : float
        -1024 for most vendors; 0 or -1000 for some.
    pixel_signed : bool
        PixelRepresentation 1 (signed) or 0 (unsigned).
    mas : float
        Exposure (mAs) written to the header.
    contrast_in_header : bool
        Write ContrastBolusAgent / Route (and the phase in SeriesDescription) for an enhanced phase.
    supersample : int
        In-plane supersampling factor: each pixel is the mean of ``supersample**2`` sub-pixel
        samples (partial volume of coarse pixels); 1 samples pixel centres.
    evaluation_only : bool
        Never used for training splits or held-out tests (:data:`LOCALIZER_PROFILES`).
    likeness : bool
        A likeness profile (:data:`REALISM_PROFILES`, issue 19): evaluation-only, and not one of
        the localizer's archive acquisitions either.
    noise_nps : tuple of float
        ``()`` (default): the kernel's Gaussian noise filter (``kernel.noise_sigma_px``).
        ``(a, c)``: noise with the filtered-back-projection power spectrum
        ``NPS(f) = (f + a) exp(-(f / c)^2)`` (``f``, ``a``, ``c`` in cycles/mm): a ramp rolled off
        by the kernel, so the grain peaks at a middle frequency as on a real scanner.
    tissue_texture : tuple of (str, float, float)
        ``()`` (default): organs are flat. Each ``(structure tag, SD HU, wavelength mm)`` adds a
        smooth 3-D random field of that SD (before the kernel blur) to the tissues of that tag
        (``Scene.tissues.ids``): fat septa, muscle striation, liver parenchyma.
    """

    name: str
    manufacturer: str
    model: str
    kvp: float
    kernel: Kernel
    noise_hu: float
    slice_thickness: float
    slice_spacing: float
    pixel_spacing: float
    matrix: int
    coverage: str
    phase: str = "native"
    held_out: bool = False
    rescale_intercept: float = -1024.0
    pixel_signed: bool = True
    mas: float = 200.0
    station: str = "CT1"
    contrast_in_header: bool = True
    supersample: int = 1
    evaluation_only: bool = False
    likeness: bool = False
    noise_nps: tuple[float, ...] = ()
    tissue_texture: tuple[tuple[str, float, float], ...] = ()

    def with_(self, **kw: object) -> "ScannerProfile":
        """A copy with some fields replaced."""
        return replace(self, **kw)  # type: ignore[arg-type]


SOFT_SIEMENS = Kernel("B30f", 0.55, 0.9, 1.0)
BONE_SIEMENS = Kernel("B70f", 0.28, 0.45, 2.6)
STANDARD_GE = Kernel("STANDARD", 0.5, 0.85, 1.0)
BONE_GE = Kernel("BONE", 0.3, 0.5, 2.4)
SOFT_CANON = Kernel("FC08", 0.6, 1.0, 0.9)
PHILIPS_B = Kernel("B", 0.5, 0.85, 1.0)
PHILIPS_YB = Kernel("YB", 0.3, 0.55, 2.2)
#: the real CT of ../shared/data/ct-upper-abdomen-j2k: Siemens Br38f; the blur (sigma 0.9 mm) is set
#: from its bone-edge width, the noise spectrum from its slice-difference NPS (eval_ct_likeness.py)
REALISM_SIEMENS = Kernel("Br38f", 0.9, 0.0, 1.0)

PROFILES: dict[str, ScannerProfile] = {p.name: p for p in [
    ScannerProfile("siemens_ap_pv", "SIEMENS", "SOMATOM Definition Edge", 120, SOFT_SIEMENS, 11.0, 5.0, 5.0,
                   0.78, 512, "abdomen_pelvis", "portal_venous", mas=180, rescale_intercept=-1024,
                   pixel_signed=False),
    ScannerProfile("siemens_abd_native_thin", "SIEMENS", "SOMATOM Force", 100, SOFT_SIEMENS, 10.0, 1.0, 1.0,
                   0.70, 512, "abdomen", "native", mas=150, pixel_signed=False),
    ScannerProfile("ge_ap_pv", "GE MEDICAL SYSTEMS", "Revolution CT", 120, STANDARD_GE, 12.0, 2.5, 2.5, 0.76,
                   512, "abdomen_pelvis", "portal_venous", mas=220),
    ScannerProfile("ge_lspine_bone", "GE MEDICAL SYSTEMS", "LightSpeed VCT", 140, BONE_GE, 9.0, 1.25, 1.25,
                   0.39, 512, "lumbar_spine", "native", mas=300),
    ScannerProfile("philips_chest", "Philips", "iCT 256", 120, PHILIPS_B, 13.0, 2.0, 1.0, 0.72, 512, "chest",
                   "native", mas=120, rescale_intercept=-1000),
    ScannerProfile("philips_ap_arterial", "Philips", "Brilliance 64", 100, PHILIPS_B, 12.0, 3.0, 3.0, 0.80,
                   512, "abdomen_pelvis", "arterial", mas=200, rescale_intercept=-1024),
    ScannerProfile("canon_ap_native", "CANON_MEC", "Aquilion ONE", 120, SOFT_CANON, 10.0, 5.0, 5.0, 0.74, 512,
                   "abdomen_pelvis", "native", mas=200, pixel_signed=False),
    ScannerProfile("siemens_lowkv_80", "SIEMENS", "SOMATOM go.Top", 80, SOFT_SIEMENS, 14.0, 3.0, 3.0, 0.74,
                   512, "abdomen", "portal_venous", mas=250, pixel_signed=False),
    # held-out scanner: vendor / kernel / kVp combination never used in training splits
    ScannerProfile("heldout_fujifilm_135", "FUJIFILM Healthcare", "SCENARIA View", 135, Kernel("FC13", 0.42,
                   0.7, 1.3), 11.0, 0.625, 0.625, 0.68, 512, "abdomen_pelvis", "native", held_out=True, mas=190,
                   rescale_intercept=-1024),
    # evaluation-only archive acquisitions (issue 14): coarse pixels and slices, no contrast attribute
    ScannerProfile("coarse_ap_native_3mm", "SIEMENS", "SOMATOM Emotion 16", 120, SOFT_SIEMENS, 9.0, 3.0, 3.0,
                   2.94, 170, "abdomen_pelvis", "native", mas=160, pixel_signed=False, supersample=3,
                   evaluation_only=True, station="CT4"),
    ScannerProfile("coarse_ap_native_6mm", "SIEMENS", "SOMATOM Emotion 16", 120, SOFT_SIEMENS, 9.0, 6.0, 6.0,
                   2.94, 170, "abdomen_pelvis", "native", mas=160, pixel_signed=False, supersample=3,
                   evaluation_only=True, station="CT4"),
    ScannerProfile("coarse_ap_pv_3mm_noagent", "GE MEDICAL SYSTEMS", "BrightSpeed", 120, STANDARD_GE, 9.0, 3.0,
                   3.0, 2.94, 170, "abdomen_pelvis", "portal_venous", mas=180, supersample=3,
                   contrast_in_header=False, evaluation_only=True, station="CT5"),
    ScannerProfile("chest_abd_arterial_noagent", "TOSHIBA", "Aquilion Prime", 120, SOFT_CANON, 12.0, 2.5, 2.5,
                   0.70, 512, "chest", "arterial", mas=180, contrast_in_header=False, evaluation_only=True,
                   station="CT6"),
    # issue 19: the likeness profile, never trained on -- closer to the real CT where
    # benchmarks/eval_ct_likeness.py found the cohort off (kernel-shaped noise grain, a blurrier
    # kernel, organ / fat / muscle texture, 3 mm slices every 2 mm, 2 x 2 in-plane partial volume)
    ScannerProfile("realism", "SIEMENS", "Biograph40_mCT", 120, REALISM_SIEMENS, 13.0, 3.0, 2.0, 0.98, 512,
                   "abdomen_pelvis", "portal_venous", mas=253, pixel_signed=False, supersample=2,
                   evaluation_only=True, likeness=True, station="CT7", noise_nps=(0.15, 0.256),
                   tissue_texture=(("subcutaneous_fat", 60.0, 4.0), ("visceral_fat", 60.0, 4.0),
                                   ("muscle", 18.0, 5.0), ("liver", 8.0, 6.0), ("spleen", 8.0, 6.0),
                                   ("kidney", 8.0, 6.0), ("trabecular", 45.0, 4.0))),
]}

#: profiles used for training splits (not held out, not evaluation-only)
TRAINING_PROFILES: tuple[str, ...] = tuple(k for k, v in PROFILES.items() if not v.held_out and not v.evaluation_only)
HELD_OUT: tuple[str, ...] = tuple(k for k, v in PROFILES.items() if v.held_out)
#: evaluation-only archive acquisitions for the localizer / L1 ROI / contrast cohort checks (issue 14)
LOCALIZER_PROFILES: tuple[str, ...] = tuple(k for k, v in PROFILES.items() if v.evaluation_only and not v.likeness)
#: likeness profiles (issue 19): evaluation-only, never in a training split, a hold-out or the localizer set
REALISM_PROFILES: tuple[str, ...] = tuple(k for k, v in PROFILES.items() if v.likeness)


def get_profile(name: str) -> ScannerProfile:
    """Look up a profile by name; the error lists the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown CT profile {name!r}; choose one of {sorted(PROFILES)}") from None

"""CT renderer: axial CT Image Storage series and fast 2-D planes from a :class:`Scene`.

Physics (clinical-physics.md sections 2 and 4): each pixel's linear
attenuation is the sum of basis partial densities x mass attenuation at the
profile's effective energy (:func:`physics.effective_energy` of the kVp);
``HU = 1000 (mu - mu_water) / mu_water``. Partial-volume across the slice
is modelled by averaging ``mu`` over sub-planes spread over the slice
thickness; the reconstruction kernel is a Gaussian in-plane blur; quantum
noise is white Gaussian noise correlated by the kernel's noise filter and
scaled to the profile's level, ``1 / sqrt(thickness)`` and patient size
(``exp(0.095 / cm x (D - 30 cm))`` for water-equivalent diameter ``D``).
Coarse-pixel profiles (``supersample`` > 1, e.g. the 3 mm pixels of
``coarse_ap_native_3mm``) average ``supersample**2`` sub-pixel samples per
pixel, so a 1 mm cortex or a 5 mm bone island is partial-volumed as on a real
coarse reconstruction instead of aliased.

Likeness profiles (issue 19, ``profiles.REALISM_PROFILES``) switch on two more effects through
profile fields whose defaults leave every other profile byte-identical: ``noise_nps`` shapes the
noise with a filtered-back-projection power spectrum (``(f + a) exp(-(f / c)^2)``, applied in the
Fourier domain) instead of the Gaussian filter, and ``tissue_texture`` adds smooth 3-D random fields
(sums of plane waves, continuous across slices, from their own random stream) to fat, muscle and
organs before the slice averaging and the kernel blur.

Contrast: the profile's phase sets the iodine of the scene; ``render_ct(...,
contrast_in_header=False)`` (or a profile with ``contrast_in_header=False``)
keeps the enhancement but writes no ContrastBolusAgent / Route and no phase in
the series description, as in archives that lack them.

Determinism: every random draw comes from ``numpy.random.default_rng`` seeded
with ``(seed, patient index)``; UIDs are ``2.25.<SHA-256 of (seed, patient,
object)>`` (:func:`uid`); dates are fixed. The same
inputs give byte-identical files.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage

from training.phantoms import physics
from training.phantoms.anatomy import Scene
from training.phantoms.profiles import PHASE_AGENT, ScannerProfile, get_profile

Arr = np.ndarray
#: implementation UID root written to every file (pydicom's)
SOFTWARE = "screener virtual cohort"


def uid(*parts: object) -> str:
    """A deterministic UID (``2.25.<int>``, 128-bit) from any printable parts.

    (``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores the
    entropy and returns a random UUID, so it cannot be used here.)
    """
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return f"2.25.{int(h[:32], 16)}"


def _coords_fn(o: Arr, u: Arr, v: Arr, spacing: tuple[float, float]) -> Callable[[Arr, Arr], tuple[Arr, Arr, Arr]]:
    def f(jj: Arr, ii: Arr) -> tuple[Arr, Arr, Arr]:
        pts = o[None, :] + (ii * spacing[1])[:, None] * u[None, :] + (jj * spacing[0])[:, None] * v[None, :]
        return pts[:, 0], pts[:, 1], pts[:, 2]
    return f


def mu_plane(scene: Scene, origin: Sequence[float], u: Sequence[float], v: Sequence[float],
             shape: tuple[int, int], spacing: tuple[float, float], kev: float, phase: str = "native",
             table: bool = False) -> tuple[Arr, Arr]:
    """Linear attenuation (cm^-1) and tissue labels on a plane (no blur, no noise)."""
    o, uu, vv = (np.asarray(a, float) for a in (origin, u, v))
    lab = scene.label_plane(o, uu, vv, shape, spacing, table=table)
    mu = scene.mu_from_labels(lab, _coords_fn(o, uu, vv, spacing), kev, phase)
    return mu, lab


def render_plane(scene: Scene, origin: Sequence[float], u: Sequence[float], v: Sequence[float],
                 shape: tuple[int, int], spacing: tuple[float, float], kev: float, *, phase: str = "native",
                 table: bool = False, blur_mm: float = 0.0, noise_hu: float = 0.0,
                 seed: int | None = None) -> Arr:
    """HU image of an arbitrary plane through the scene (the fast 2-D training path).

    Parameters
    ----------
    scene : Scene
    origin : sequence of float
        Patient position (mm) of pixel ``[0, 0]``.
    u, v : sequence of float
        Unit vectors of increasing column and row index (e.g. axial ``(1,0,0), (0,1,0)``;
        coronal ``(1,0,0), (0,0,-1)``; sagittal ``(0,1,0), (0,0,-1)``).
    shape : tuple of int
        ``(rows, columns)``.
    spacing : tuple of float
        ``(row spacing, column spacing)`` in mm.
    kev : float
        Effective energy (keV).
    phase, table : str, bool
        Contrast phase; include the CT couch.
    blur_mm, noise_hu, seed : float, float, int
        Optional in-plane Gaussian blur (sigma, mm) and white noise SD (HU).

    Returns
    -------
    numpy.ndarray
        ``float32`` HU, shape ``shape``.
    """
    mu, _ = mu_plane(scene, origin, u, v, shape, spacing, kev, phase, table)
    mw = physics.mu_water(kev)
    hu = 1000.0 * (mu - mw) / mw
    if blur_mm > 0:
        hu = ndimage.gaussian_filter(hu, (blur_mm / spacing[0], blur_mm / spacing[1]))
    if noise_hu > 0:
        rng = np.random.default_rng(seed)
        hu = hu + rng.standard_normal(hu.shape) * noise_hu
    return hu.astype(np.float32)


def axial_through(scene: Scene, label: str = "L1", fov_mm: float = 400.0, matrix: int = 512,
                  offset_mm: float = 0.0) -> dict[str, Any]:
    """Plane arguments for an axial image through a vertebra's centroid (for :func:`render_plane`)."""
    c = np.asarray(scene.vertebra(label).centroid_mm)
    yc = scene.landmarks["body_centre_y_l1"]
    ps = fov_mm / matrix
    o = np.array([-fov_mm / 2 + ps / 2, yc - fov_mm / 2 + ps / 2, c[2] + offset_mm])
    return {"origin": o, "u": (1.0, 0.0, 0.0), "v": (0.0, 1.0, 0.0), "shape": (matrix, matrix),
            "spacing": (ps, ps)}


def coverage_range(scene: Scene, coverage: str, rng: np.random.Generator) -> tuple[float, float]:
    """Superior and inferior z (mm) of a body coverage for this patient (with a little jitter)."""
    lm = scene.landmarks
    j = lambda sd: float(rng.normal(0.0, sd))  # noqa: E731
    zd = max(lm["diaphragm_z"])
    if coverage == "chest":
        # the phantom's spine starts at T6: a "chest" series is the lower chest + upper abdomen
        top = scene.vertebra("T6").centroid_mm[2] + 5.0
        return top + j(5), scene.vertebra("L2").centroid_mm[2] + j(8)
    if coverage == "abdomen":
        return zd + 25.0 + j(8), lm["z_iliac_crest"] - 25.0 + j(10)
    if coverage == "abdomen_pelvis":
        return zd + 25.0 + j(8), lm["z_hip"] - 70.0 + j(8)
    if coverage == "lumbar_spine":
        return scene.vertebra("T12").centroid_mm[2] + 10.0 + j(5), lm["z_s1"] - 35.0 + j(5)
    raise ValueError(f"unknown coverage {coverage!r}")


def _size_factor(lab: Arr, table_ids: Arr, ps: float) -> float:
    body = (lab != 0) & ~np.isin(lab, table_ids)
    area_cm2 = float(body.sum()) * (ps / 10.0) ** 2
    if area_cm2 < 1.0:
        return 0.7
    d = 2.0 * np.sqrt(area_cm2 / np.pi)
    return float(np.clip(np.exp(0.095 * (d - 30.0)), 0.5, 4.0))


#: tissue texture runs along the body axis (muscle fibres, fat septa, vertical trabeculae): its
#: wavelength along z is this many times the in-plane one, so it persists over a few slices
TEXTURE_Z_STRETCH = 4.0


def _texture_waves(seed: int, index: int, k: int, wavelength_mm: float, n_waves: int = 16) -> tuple[Arr, Arr]:
    """Wave vectors (rad/mm) and phases of texture field ``k`` of a patient (own random stream)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x7E, int(k)])
    d = rng.normal(size=(n_waves, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    kk = d * (2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.3, size=n_waves)))[:, None]
    kk[:, 2] /= TEXTURE_Z_STRETCH
    return kk, rng.uniform(0, 2 * np.pi, size=n_waves)


def _add_tissue_texture(mu: Arr, lab: Arr, scene: Scene, origin: Arr, ps: float, mw: float,
                        fields: list[tuple[Arr, float, Arr, Arr]]) -> Arr:
    """``mu`` plus each texture field (``(tissue ids, SD HU, wave vectors, phases)``) on its tissues."""
    for ids, sd, kk, phi in fields:
        jj, ii = np.nonzero(np.isin(lab, ids))
        if jj.size == 0:
            continue
        x = origin[0] + ii * ps
        y = origin[1] + jj * ps
        acc = np.zeros(jj.size)
        for w in range(len(phi)):
            acc += np.cos(kk[w, 0] * x + kk[w, 1] * y + kk[w, 2] * origin[2] + phi[w])
        mu[jj, ii] += (sd * np.sqrt(2.0 / len(phi)) / 1000.0 * mw) * acc
    return mu


def _nps_noise(rng: np.random.Generator, n: int, ps: float, a: float, c: float) -> Arr:
    """Unit-SD noise with the power spectrum ``(f + a) exp(-(f / c)^2)`` (``f`` cycles/mm)."""
    wn = rng.standard_normal((n, n))
    f = np.fft.fftfreq(n, d=ps)
    fr = np.hypot(f[None, :], f[:, None])
    out = np.real(np.fft.ifft2(np.fft.fft2(wn) * np.sqrt((fr + a) * np.exp(-(fr / c) ** 2))))
    return (out / max(float(out.std()), 1e-9)).astype(np.float32)


def _field_of_view(scene: Scene, profile: ScannerProfile, rng: np.random.Generator
                   ) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """Pixel spacing, field-of-view centre and the (x, y) of pixel [0, 0] of a series: the
    technologist widens the display FOV to fit the body (all but lumbar-spine coverage) and centres
    it with a few mm of jitter (``rng``'s next two normal draws)."""
    N = profile.matrix
    ps = profile.pixel_spacing
    if profile.coverage != "lumbar_spine":
        (x0, x1), (y0, y1), _ = scene.bounds()
        need = max(x1 - x0, y1 - y0 + 30.0) + 24.0
        ps = float(np.ceil(max(ps, need / N) * 100.0) / 100.0)
    fov = ps * N
    if profile.coverage == "lumbar_spine":
        cx, cy = 0.0 + rng.normal(0, 4), scene.vertebra("L3").centroid_mm[1] + 25.0 + rng.normal(0, 4)
    else:
        cx = rng.normal(0, 8)
        (_, _), (y0, y1), _ = scene.bounds()
        cy = 0.5 * (y0 + y1) + 12.0 + rng.normal(0, 6)
    return ps, (cx, cy), (cx - fov / 2 + ps / 2, cy - fov / 2 + ps / 2)


def render_volume(scene: Scene, profile: ScannerProfile, seed: int,
                  z_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Render the HU volume of a series (no DICOM): arrays plus geometry.

    Returns a dict with ``hu`` (float32, ``[slice, row, col]``, superior slice
    first), ``z`` (slice centres), ``origin_xy`` (x, y of pixel [0, 0]),
    ``pixel_spacing``, ``kev``, ``noise_sd`` (per slice) and ``fov_centre``.
    """
    p = scene.patient
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, p.index, 0xC7])
    kev = physics.effective_energy(profile.kvp)
    mw = physics.mu_water(kev)
    z_top, z_bot = z_range if z_range is not None else coverage_range(scene, profile.coverage, rng)
    n = int(np.floor((z_top - z_bot) / profile.slice_spacing)) + 1
    zs = z_top - np.arange(n) * profile.slice_spacing
    N = profile.matrix
    ps, (cx, cy), (ox, oy) = _field_of_view(scene, profile, rng)
    ss = max(1, int(getattr(profile, "supersample", 1)))
    if ss > 1:  # sub-pixel grid: pixel [j, i] is the mean of sub-pixels [j*ss:(j+1)*ss, i*ss:(i+1)*ss]
        ps_f, N_f = ps / ss, N * ss
        origin_f = np.array([ox - ps / 2 + ps_f / 2, oy - ps / 2 + ps_f / 2, 0.0])
    else:
        ps_f, N_f, origin_f = ps, N, np.array([ox, oy, 0.0])
    u = np.array([1.0, 0.0, 0.0])
    v = np.array([0.0, 1.0, 0.0])
    n_sub = int(min(4, max(1, np.ceil(profile.slice_thickness / 1.3))))
    offs = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * profile.slice_thickness
    cache: dict[float, tuple[Arr, Arr]] = {}
    table_ids = scene.tissues.ids("table")
    sig_blur = profile.kernel.sigma_mm / ps
    ii, jj = np.meshgrid(np.arange(N), np.arange(N))
    r2 = ((ii - (N - 1) / 2) ** 2 + (jj - (N - 1) / 2) ** 2)
    outside = r2 > (N / 2) ** 2
    hu_out = np.empty((n, N, N), np.float32)
    noise_sd = np.empty(n)
    bias = rng.normal(0.0, 2.0)
    tex_fields = []
    for t, (tag, t_sd, t_lam) in enumerate(getattr(profile, "tissue_texture", ()) or ()):
        t_ids = scene.tissues.ids(tag)
        if t_ids.size:
            tex_fields.append((t_ids, float(t_sd), *_texture_waves(seed, p.index, t, float(t_lam))))
    nps = tuple(getattr(profile, "noise_nps", ()) or ())
    for k, z in enumerate(zs):
        acc = None
        lab_c = None
        for off in offs:
            zk = round(float(z + off), 3)
            if zk not in cache:
                o = origin_f.copy()
                o[2] = zk
                cache[zk] = mu_plane(scene, o, u, v, (N_f, N_f), (ps_f, ps_f), kev, profile.phase, table=True)
                if tex_fields:
                    cache[zk] = (_add_tissue_texture(cache[zk][0], cache[zk][1], scene, o, ps_f, mw, tex_fields),
                                 cache[zk][1])
            mu, lab = cache[zk]
            acc = mu.copy() if acc is None else acc + mu
            if lab_c is None or abs(off) < 1e-9 or (off == offs[len(offs) // 2]):
                lab_c = lab
        # drop cache entries above the slice (z decreases)
        for key in [q for q in cache if q > z + profile.slice_thickness]:
            del cache[key]
        mu = acc / n_sub
        if ss > 1:
            mu = mu.reshape(N, ss, N, ss).mean(axis=(1, 3))
        hu = 1000.0 * (mu - mw) / mw
        if sig_blur > 0.05:
            hu = ndimage.gaussian_filter(hu, sig_blur, mode="nearest")
        sd = (profile.noise_hu * profile.kernel.noise_factor * np.sqrt(5.0 / profile.slice_thickness)
              * _size_factor(lab_c, table_ids, ps_f))
        if nps:
            wn = _nps_noise(rng, N, ps, float(nps[0]), float(nps[1]))
        else:
            wn = rng.standard_normal((N, N)).astype(np.float32)
        if not nps and profile.kernel.noise_sigma_px > 0.05:
            wn = ndimage.gaussian_filter(wn, profile.kernel.noise_sigma_px)
            wn /= max(float(wn.std()), 1e-6)
        hu = hu + sd * wn + bias
        hu[outside] = np.nan
        hu_out[k] = hu
        noise_sd[k] = sd
    return {"hu": hu_out, "z": zs, "origin_xy": (ox, oy), "pixel_spacing": ps, "kev": kev,
            "noise_sd": noise_sd, "fov_centre": (cx, cy), "n_sub": n_sub}


def patient_study_header(scene: Scene, kind: str, seed: int) -> Dataset:
    """Patient + study attributes of one study of a patient (shared conventions with A2's studies).

    Uses :func:`training.phantoms.projection_dicom.patient_dataset`, so every
    study of a patient (``"ct"``, ``"hip_xray"``, ``"dxa"``) carries the same
    PatientID / PatientName and its own StudyInstanceUID, date and accession
    number, all derived from ``(seed, patient_id, kind)``.
    """
    from training.phantoms.projection_dicom import patient_dataset

    ds = patient_dataset(scene.patient, seed, kind, study_description={
        "ct": "CT virtual cohort", "hip_xray": "XR pelvis AP", "dxa": "DXA lumbar spine"}.get(kind, kind),
        series_description="", modality="CT", body_part="ABDOMEN")
    ds.PatientComments = "Synthetic patient of the screener virtual cohort (not a real person)"
    # deterministic study UID (A2's helper draws it with generate_uid(prefix=None), which is random)
    ds.StudyInstanceUID = uid("study", seed, scene.patient.patient_id, kind)
    return ds


def render_ct(scene: Scene, profile: ScannerProfile | str, seed: int,
              z_range: tuple[float, float] | None = None, series_number: int = 2,
              contrast_in_header: bool | None = None) -> list[Dataset]:
    """Render an axial CT series as CT Image Storage datasets.

    Parameters
    ----------
    scene : Scene
    profile : ScannerProfile or str
        Acquisition profile (or its name in :data:`profiles.PROFILES`).
    seed : int
        Cohort seed (noise, jitter and UIDs derive from it and the patient index).
    z_range : tuple of float, optional
        ``(z_top, z_bottom)`` in patient mm instead of the profile's coverage.
    series_number : int
    contrast_in_header : bool, optional
        False: render the phase's enhancement but write no ContrastBolusAgent / Route and no
        phase in SeriesDescription; None (default) follows ``profile.contrast_in_header``.

    Returns
    -------
    list of pydicom.dataset.Dataset
        One dataset per slice, superior first (InstanceNumber 1 = most superior),
        with file meta, ready for ``save_as``.
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    p = scene.patient
    vol = render_volume(scene, prof, seed, z_range)
    hdr = patient_study_header(scene, "ct", seed)
    series_uid = uid("series", seed, p.patient_id, "ct", prof.name)
    for_uid = uid("for", seed, p.patient_id, "ct")
    slope = 1.0
    icpt = float(prof.rescale_intercept)
    if prof.pixel_signed:
        lo, hi, dtype, pad = -32768, 32767, np.int16, -2000
    else:
        lo, hi, dtype, pad = 0, 4095, np.uint16, 0
    show_contrast = prof.contrast_in_header if contrast_in_header is None else bool(contrast_in_header)
    agent = PHASE_AGENT[prof.phase] if show_contrast else ""
    kev = vol["kev"]
    ox, oy = vol["origin_xy"]
    N = prof.matrix
    out: list[Dataset] = []
    for k, z in enumerate(vol["z"]):
        hu = vol["hu"][k]
        stored = np.where(np.isnan(hu), np.nan, np.round((hu - icpt) / slope))
        stored = np.clip(np.nan_to_num(stored, nan=pad), lo, hi).astype(dtype)
        ds = Dataset()
        _ct_series_attributes(ds, hdr, prof, show_contrast=show_contrast, agent=agent,
                              fov_mm=vol['pixel_spacing'] * N)
        ds.SOPInstanceUID = uid("sop", series_uid, k)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{ox:.3f}", f"{oy:.3f}", f"{z:.3f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.3f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = N
        ds.Columns = N
        ds.PixelSpacing = [f"{vol['pixel_spacing']:.6g}", f"{vol['pixel_spacing']:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16 if prof.pixel_signed else 12
        ds.HighBit = 15 if prof.pixel_signed else 11
        ds.PixelRepresentation = 1 if prof.pixel_signed else 0
        ds.PixelPaddingValue = pad
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = f"{icpt:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()
        ds.BurnedInAnnotation = "NO"
        # private-free provenance: effective energy and noise in the image comments
        ds.ImageComments = f"virtual cohort; effective energy {kev:.1f} keV; noise SD {vol['noise_sd'][k]:.1f} HU"
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = ds.SOPClassUID
        fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = fm
        out.append(ds)
    return out


def _ct_series_attributes(ds: Dataset, hdr: Dataset, prof: ScannerProfile, *, show_contrast: bool, agent: str,
                          fov_mm: float) -> None:
    """Set what every slice of the series shares: patient, study, equipment, acquisition, contrast."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = hdr.StudyDate
    ds.SeriesDate = hdr.StudyDate
    ds.AcquisitionDate = hdr.StudyDate
    ds.ContentDate = hdr.StudyDate
    ds.StudyTime = hdr.StudyTime
    ds.SeriesTime = hdr.StudyTime
    ds.AcquisitionTime = hdr.StudyTime
    ds.ContentTime = hdr.StudyTime
    ds.AccessionNumber = hdr.AccessionNumber
    ds.Modality = "CT"
    ds.Manufacturer = prof.manufacturer
    ds.InstitutionName = "Virtual Cohort Hospital"
    ds.ReferringPhysicianName = hdr.ReferringPhysicianName
    ds.StationName = prof.station
    ds.InstitutionalDepartmentName = "Radiology"
    ds.StudyDescription = hdr.StudyDescription
    ds.SeriesDescription = {
        "abdomen_pelvis": "Abdomen-Pelvis", "abdomen": "Abdomen", "chest": "Thorax",
        "lumbar_spine": "L-Spine"}[prof.coverage] + f" {prof.slice_thickness:g}mm {prof.kernel.name}" + (
        "" if (prof.phase == "native" or not show_contrast)
        else {"arterial": " arterial", "portal_venous": " PV"}[prof.phase])
    ds.ManufacturerModelName = prof.model
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                "PatientSize", "PatientWeight", "PatientIdentityRemoved", "PatientComments"):
        setattr(ds, key, getattr(hdr, key))
    if agent:
        ds.ContrastBolusAgent = agent
        ds.ContrastBolusRoute = "IV"
    ds.BodyPartExamined = {"abdomen_pelvis": "ABDOMEN", "abdomen": "ABDOMEN", "chest": "CHEST",
                           "lumbar_spine": "LSPINE"}[prof.coverage]
    ds.SliceThickness = f"{prof.slice_thickness:g}"
    ds.KVP = f"{prof.kvp:g}"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = SOFTWARE
    ds.ReconstructionDiameter = f"{fov_mm:.1f}"
    ds.XRayTubeCurrent = int(prof.mas / 0.5)
    ds.Exposure = int(prof.mas)
    ds.ConvolutionKernel = prof.kernel.name
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = hdr.StudyInstanceUID
    ds.StudyID = hdr.StudyID


def write_series(datasets: Sequence[Dataset], folder: str | Path) -> list[Path]:
    """Write datasets as ``<folder>/<InstanceNumber:04d>.dcm``; returns the paths."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = d / f"{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_volume(paths: Sequence[str | Path]) -> tuple[Arr, Arr, tuple[float, float], tuple[float, float]]:
    """Read a written series back: HU array (superior first), slice z, origin (x, y), pixel spacing."""
    dss = [pydicom.dcmread(str(pth)) for pth in paths]
    dss.sort(key=lambda d: -float(d.ImagePositionPatient[2]))
    arr = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                    for d in dss])
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    o = (float(dss[0].ImagePositionPatient[0]), float(dss[0].ImagePositionPatient[1]))
    ps = (float(dss[0].PixelSpacing[0]), float(dss[0].PixelSpacing[1]))
    return arr, z, o, ps

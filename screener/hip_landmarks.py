"""Find the hips of a radiograph before measuring them: femoral-head and femoral-neck landmarks.

A hip radiograph in an archive is a whole AP pelvis as often as one hip, off-centre, collimated,
mirrored or inverted.  Splitting it at the midline invents a hip where there is none.  This module
finds each hip first:

1. :func:`landmark_input` -- the one preprocessing of the landmark network (training and
   inference): the stored pixels through the Modality and VOI LUTs (``MONOCHROME1`` inverted) by
   :func:`screener.radiograph.read_radiograph`, 1st-99.5th percentile to ``[0, 1]``, the longer
   side resized to :data:`INPUT_SIZE` and the image placed in the top-left corner of a square of
   zeros.  The image is *not* re-oriented by the header: the network reads it as displayed.
2. :class:`HipLandmarkNet` -- a small U-Net that returns, at half the input resolution, four
   heat maps: femoral-head centre and femoral-neck ROI centre of the hip whose pelvis (medial side)
   lies towards increasing column ("plus"), and of the hip whose pelvis lies towards decreasing
   column ("minus").  In the standard display (patient's right on the image left) the plus hip is
   the patient's right hip.
   From 0.5.0 the maps are averaged with those of the left-right mirrored input (:func:`heatmaps`,
   test-time flip averaging; the card's ``decoding.flip_average`` can turn it off).
   From 0.6.0 a second, fine stage (:func:`refine_hips`, the bundle's ``refine/`` sub-bundle) reads
   the femoral-neck ROI centre again from a crop around each coarse femoral head.
3. :func:`decode_heatmaps` -- per anatomical side: presence probability (peak of the head map),
   head and neck centres (peak with a local centroid), and a confidence.
4. :func:`decide_side` -- which patient side a hip is: from ``PatientOrientation`` when the header
   states the left-right direction of the columns; else from ``ImageLaterality`` / ``Laterality``
   when exactly one hip is found; else from anatomy with the standard display assumed; "side not
   determined" when these disagree or the anatomy is ambiguous.
5. Implant metal (arthroplasty, nail, screw) in the femoral head or neck, two checks, either one
   declines the hip: :func:`metal_in_hip` on the stored values (far above the image's own bone
   level), and from 0.4.0 the network's own metal maps (:data:`METAL_CHANNELS`: the femoral-head
   heat map of a hip that holds metal) read at the head it found.

The weights are the bundle ``models/hip_landmarks`` (:func:`load_landmark_bundle`), trained on
the virtual cohort by :mod:`training.hip_landmarks`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from scipy import ndimage
from torch import nn

log = structlog.get_logger(__name__)

__all__ = ["ANATOMY", "CHANNELS", "FLIP_AVERAGE", "INPUT_SIZE", "METAL_CHANNELS", "OUTPUT_STRIDE", "HeaderSides", "HipLandmark", "HipLandmarkNet",
           "LandmarkInput", "decide_side", "decode_heatmaps", "find_hips", "header_sides", "heatmaps", "landmark_input",
           "load_landmark_bundle", "metal_in_hip", "mirror_input", "unmirror_heatmaps"]

#: square network input (pixels)
INPUT_SIZE = 256
#: heat maps are at ``INPUT_SIZE // OUTPUT_STRIDE``
OUTPUT_STRIDE = 2
#: anatomical sides: the hip whose pelvis lies towards increasing ("plus") / decreasing column
ANATOMY = ("plus", "minus")
CHANNELS = ("head_plus", "neck_plus", "head_minus", "neck_minus")
#: optional (bundles >= 0.4.0): the head map of a hip holding implant metal, plus and minus
METAL_CHANNELS = ("metal_plus", "metal_minus")
#: a hip holds metal when its metal map reaches this probability at its head (bundle card may override)
METAL_NET_THRESHOLD = 0.5
#: a hip is present when the peak of its head map reaches this probability (bundle card may override)
PRESENCE_THRESHOLD = 0.5
#: metal: a pixel brighter than the image's median by this many median-to-bone spans ...
METAL_SPAN = 1.5
#: ... and at least this fraction of the head / neck ROI (or this many mm2) made of such pixels
METAL_FRACTION = 0.04
METAL_MIN_MM2 = 30.0
#: a femoral-head candidate this fraction of the presence threshold counts as a hip when it holds metal
METAL_RESCUE = 0.5
#: average the maps of the input and of its left-right mirror (:func:`heatmaps`; bundle card may override)
FLIP_AVERAGE = True


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
@dataclass
class LandmarkInput:
    """The landmark network's input and the map back to the stored pixels.

    Attributes
    ----------
    image : numpy.ndarray
        ``float32 (INPUT_SIZE, INPUT_SIZE)`` in ``[0, 1]``; the radiograph fills the top-left
        ``content_shape``.
    scale : tuple of float
        Stored pixels per input pixel ``(rows, cols)``.
    content_shape : tuple of int
        Rows and columns of the input covered by the radiograph.
    stored_shape : tuple of int
        ``(Rows, Columns)`` of the stored image.
    spacing_mm : tuple of float
        Pixel spacing of the stored image (row, column), mm at the patient.
    display : numpy.ndarray
        The radiograph on the stored grid in ``[0, 1]`` (percentile-normalised), for overlays.
    raw : numpy.ndarray
        The stored values through the Modality LUT, bone bright (negated for ``MONOCHROME1``), no
        VOI window: the metal check compares them with the image's own bone and soft tissue.
    """

    image: np.ndarray
    scale: tuple[float, float]
    content_shape: tuple[int, int]
    stored_shape: tuple[int, int]
    spacing_mm: tuple[float, float]
    display: np.ndarray
    raw: np.ndarray | None = None
    radiograph: Any = None

    def to_stored(self, rows: Any, cols: Any) -> tuple[np.ndarray, np.ndarray]:
        """Input pixel coordinates -> stored pixel coordinates (pixel centres at integers)."""
        r = (np.asarray(rows, dtype=np.float64) + 0.5) * self.scale[0] - 0.5
        c = (np.asarray(cols, dtype=np.float64) + 0.5) * self.scale[1] - 0.5
        return r, c

    def from_stored(self, rows: Any, cols: Any) -> tuple[np.ndarray, np.ndarray]:
        """Stored pixel coordinates -> input pixel coordinates."""
        r = (np.asarray(rows, dtype=np.float64) + 0.5) / self.scale[0] - 0.5
        c = (np.asarray(cols, dtype=np.float64) + 0.5) / self.scale[1] - 0.5
        return r, c


def _normalise(values: np.ndarray) -> np.ndarray:
    """1st-99.5th percentile of the image to ``[0, 1]``."""
    v = np.asarray(values, dtype=np.float32)
    lo, hi = np.percentile(v, [1.0, 99.5])
    return np.clip((v - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def landmark_input(ds: Any, size: int = INPUT_SIZE) -> LandmarkInput:
    """Radiograph dataset -> the landmark network's input (training and inference alike).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A greyscale projection radiograph with pixel data and a pixel spacing.
    size : int
        Side of the square input.

    Returns
    -------
    LandmarkInput

    Raises
    ------
    screener.radiograph.RadiographError
        Colour or multi-frame image, undecodable pixels, no pixel spacing.
    """
    from screener.radiograph import read_radiograph

    rad = read_radiograph(ds, None)
    img = _normalise(rad.image)
    h, w = img.shape
    f = size / float(max(h, w))
    nh, nw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    src = img
    if f < 0.5:  # anti-alias before shrinking a large radiograph
        src = ndimage.gaussian_filter(img, 0.4 / f)
    small = ndimage.zoom(src, (nh / h, nw / w), order=1, mode="nearest", grid_mode=True)[:nh, :nw]
    out = np.zeros((size, size), dtype=np.float32)
    out[: small.shape[0], : small.shape[1]] = small
    spacing = tuple(float(v) for v in rad.source_spacing_mm)
    # input px -> resampled px (h / nh) -> stored px (rad.pixel_mm / spacing)
    k = (rad.pixel_mm / spacing[0], rad.pixel_mm / spacing[1])
    scale = (h / nh * k[0], w / nw * k[1])
    stored_shape = (int(ds.Rows), int(ds.Columns))
    display = img
    if img.shape != stored_shape:
        display = ndimage.zoom(img, (stored_shape[0] / h, stored_shape[1] / w), order=1, grid_mode=True,
                               mode="nearest")[: stored_shape[0], : stored_shape[1]]
    raw = None
    try:
        raw = np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.get("RescaleSlope", 1) or 1) \
            + float(ds.get("RescaleIntercept", 0) or 0)
        if raw.shape != stored_shape:
            raw = None
        elif rad.inverted:
            raw = -raw
    except (AttributeError, TypeError, ValueError):
        raw = None
    return LandmarkInput(image=out, scale=scale, content_shape=(int(small.shape[0]), int(small.shape[1])),
                         stored_shape=stored_shape, spacing_mm=spacing, display=display, raw=raw, radiograph=rad)


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------
def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class HipLandmarkNet(nn.Module):
    """U-Net heat-map network: ``(B, 1, S, S)`` -> ``(B, 4, S/2, S/2)`` logits (:data:`CHANNELS`).

    Parameters
    ----------
    widths : tuple of int
        Channels at strides 2, 4, 8, 16, 32, 64.
    out_channels : int
        Heat maps (4: head and neck of the plus and minus hips).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 24, 32, 48, 64, 96), out_channels: int = 4) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.down = nn.ModuleList()
        cin = 1
        for w in self.widths:
            self.down.append(_block(cin, w, stride=2))
            cin = w
        self.up = nn.ModuleList()
        for skip in reversed(self.widths[:-1]):
            self.up.append(_block(cin + skip, skip))
            cin = skip
        self.head = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(cin, out_channels, 1))
        nn.init.constant_(self.head[-1].bias, -4.0)  # start near "nothing here"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Heat-map logits at half the input resolution."""
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            s = skips.pop()
            x = nn.functional.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, s], dim=1))
        return self.head(x)


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
def _peak(heat: np.ndarray, radius: int = 2) -> tuple[float, float, float]:
    """``(value, row, col)`` of the map's maximum, refined by the centroid of its neighbourhood."""
    idx = int(np.argmax(heat))
    r, c = divmod(idx, heat.shape[1])
    v = float(heat[r, c])
    r0, r1 = max(0, r - radius), min(heat.shape[0], r + radius + 1)
    c0, c1 = max(0, c - radius), min(heat.shape[1], c + radius + 1)
    win = heat[r0:r1, c0:c1]
    wgt = np.maximum(win - 0.5 * v, 0.0)
    if wgt.sum() <= 0:
        return v, float(r), float(c)
    rr, cc = np.mgrid[r0:r1, c0:c1]
    return v, float((wgt * rr).sum() / wgt.sum()), float((wgt * cc).sum() / wgt.sum())


@dataclass
class HipLandmark:
    """One hip the network found (or its best guess where it found none).

    Attributes
    ----------
    anatomy : str
        ``"plus"`` (pelvis towards increasing column) or ``"minus"``.
    probability : float
        Presence probability (peak of the head map).
    head_px, neck_px : tuple of float
        Stored-pixel ``(row, col)`` of the femoral-head centre and the femoral-neck ROI centre.
    confidence : float
        ``probability`` times the neck map's peak, lowered when the other anatomical side fires at
        the same place (an ambiguous hip).
    ambiguity : float
        Peak of the other side's head map within 15 mm of this head, over this head's peak.
    side : str or None
        Patient side after :func:`decide_side` (``None``: side not determined).
    side_source : str
        How the side was decided.
    present : bool
        Above the presence threshold (or a weaker candidate holding implant metal).
    metal : bool
        Implant metal in the femoral head or neck (:func:`metal_in_hip`).
    metal_fraction : float
        Share of the head / neck ROI that reads as metal.
    metal_probability : float
        The network's metal map at this head (0 for a bundle without metal maps).
    details : dict
        Notes for the finding (suppressed duplicate, side conflict, found by metal).
    """

    anatomy: str
    probability: float
    head_px: tuple[float, float]
    neck_px: tuple[float, float]
    confidence: float
    ambiguity: float = 0.0
    side: str | None = None
    side_source: str = ""
    present: bool = False
    metal: bool = False
    metal_fraction: float = 0.0
    metal_probability: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def decode_heatmaps(heat: np.ndarray, inp: LandmarkInput, threshold: float = PRESENCE_THRESHOLD) -> dict[str, HipLandmark]:
    """Heat-map probabilities -> one :class:`HipLandmark` per anatomical side.

    Parameters
    ----------
    heat : numpy.ndarray
        ``(4, S/2, S/2)`` sigmoid probabilities in :data:`CHANNELS` order, optionally followed by
        the two :data:`METAL_CHANNELS`.
    inp : LandmarkInput
        The input they came from (maps back to stored pixels).
    threshold : float
        Presence threshold on the head map's peak.

    Returns
    -------
    dict
        ``{"plus": HipLandmark, "minus": HipLandmark}``.
    """
    heat = np.asarray(heat, dtype=np.float64).copy()
    # nothing outside the radiograph
    ch, cw = (int(np.ceil(s / OUTPUT_STRIDE)) for s in inp.content_shape)
    heat[:, ch:, :] = 0.0
    heat[:, :, cw:] = 0.0
    out: dict[str, HipLandmark] = {}
    mm_per_out = OUTPUT_STRIDE * inp.scale[0] * inp.spacing_mm[0]
    for k, anat in enumerate(ANATOMY):
        hv, hr, hc = _peak(heat[2 * k])
        # the neck: the neck map's peak within ~70 mm of the head
        nmap = heat[2 * k + 1].copy()
        rr, cc = np.mgrid[0 : nmap.shape[0], 0 : nmap.shape[1]]
        far = np.hypot(rr - hr, cc - hc) * mm_per_out > 70.0
        nmap[far] = 0.0
        nv, nr, nc = _peak(nmap)
        other = heat[2 * (1 - k)]
        near = np.hypot(rr - hr, cc - hc) * mm_per_out <= 15.0
        amb = float(other[near].max() / max(hv, 1e-6)) if near.any() else 0.0
        metal_p = 0.0
        if heat.shape[0] >= len(CHANNELS) + len(METAL_CHANNELS):
            mmap = heat[len(CHANNELS) + k]
            metal_p = float(mmap[np.hypot(rr - hr, cc - hc) * mm_per_out <= 6.0].max(initial=0.0))
        to = lambda r, c: tuple(float(v) for v in inp.to_stored(r * OUTPUT_STRIDE + (OUTPUT_STRIDE - 1) / 2.0,  # noqa: E731
                                                                   c * OUTPUT_STRIDE + (OUTPUT_STRIDE - 1) / 2.0))
        out[anat] = HipLandmark(anatomy=anat, probability=hv, head_px=to(hr, hc), neck_px=to(nr, nc),
                                confidence=float(hv * max(nv, 1e-3) ** 0.5 * (1.0 - 0.5 * min(amb, 1.0))),
                                ambiguity=amb, present=hv >= threshold, metal_probability=metal_p)
    _one_hip_per_head(out, inp)
    return out


def _one_hip_per_head(hips: dict[str, HipLandmark], inp: LandmarkInput) -> None:
    """One hip cannot be both sides: where both fire at one head (< 40 mm), keep the stronger."""
    a, b = hips["plus"], hips["minus"]
    if a.present and b.present:
        d = np.hypot(a.head_px[0] - b.head_px[0], a.head_px[1] - b.head_px[1]) * inp.spacing_mm[0]
        if d < 40.0:
            weaker = a if a.probability < b.probability else b
            weaker.present = False
            weaker.details["suppressed"] = f"same femoral head as the other side's ({d:.0f} mm apart)"


# ---------------------------------------------------------------------------------------------
# side
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeaderSides:
    """What the header says about left and right.

    Attributes
    ----------
    column_toward : str or None
        ``"L"`` / ``"R"``: the patient direction of increasing column (``PatientOrientation``
        first value); ``None`` when absent, empty or not a left-right direction.
    laterality : str or None
        ``ImageLaterality`` or ``Laterality``: ``"R"``, ``"L"``, ``"B"`` or ``None``.
    source : str
        Which attribute gave ``column_toward``.
    """

    column_toward: str | None
    laterality: str | None
    source: str = ""


def _first_letter(value: Any) -> str:
    s = str(value or "").strip().upper()
    return s[:1] if s[:1] in ("L", "R", "H", "F", "A", "P") else ""


def header_sides(ds: Any) -> HeaderSides:
    """Read ``PatientOrientation``, ``ImageLaterality`` and ``Laterality`` leniently.

    An absent, empty or malformed ``PatientOrientation`` gives ``column_toward = None`` (never an
    error); so does one whose columns do not run left-right.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset or mapping

    Returns
    -------
    HeaderSides
    """
    get = ds.get
    po = get("PatientOrientation", None)
    col = ""
    try:
        if isinstance(po, str):
            parts = po.split("\\")
        elif po is None:
            parts = []
        else:
            parts = [str(v) for v in po]
        if len(parts) == 2:
            col = _first_letter(parts[0])
    except (TypeError, ValueError):
        col = ""
    lat = ""
    for key in ("ImageLaterality", "Laterality"):
        v = str(get(key, "") or "").strip().upper()
        if v in ("R", "L", "B"):
            lat = v
            break
    return HeaderSides(column_toward=col if col in ("L", "R") else None, laterality=lat or None,
                       source="PatientOrientation" if col in ("L", "R") else "")


def decide_side(hips: list[HipLandmark], header: HeaderSides, *, ambiguity_limit: float = 0.6) -> None:
    """Set ``side`` and ``side_source`` of each present hip, in place.

    Order of trust: ``PatientOrientation`` (the plus hip is the patient's right when the columns
    run towards the patient's left, the left when they run towards the right); then, for a single
    hip, ``ImageLaterality`` / ``Laterality``; then anatomy with the standard display assumed (the
    patient's right on the image left, so the plus hip is the right).  Side not determined
    (``side = None``) when the laterality contradicts the orientation, or, on anatomy alone, when
    the other side's head map fires at the same head (``ambiguity`` above ``ambiguity_limit``).

    Parameters
    ----------
    hips : list of HipLandmark
        The present hips.
    header : HeaderSides
    ambiguity_limit : float
    """
    single = len(hips) == 1
    lat = header.laterality if header.laterality in ("R", "L") else None
    for h in hips:
        if header.column_toward in ("L", "R"):
            right_is_plus = header.column_toward == "L"
            h.side = "R" if (h.anatomy == "plus") == right_is_plus else "L"
            h.side_source = f"PatientOrientation (columns towards the patient's {'left' if right_is_plus else 'right'})"
            if single and lat and lat != h.side:
                h.details["side_conflict"] = (f"ImageLaterality {lat} contradicts PatientOrientation and the anatomy "
                                              f"({h.side})")
                h.side, h.side_source = None, "side not determined: header laterality and orientation disagree"
            continue
        if single and lat:
            h.side, h.side_source = lat, "ImageLaterality/Laterality (one hip in the image)"
            anatomic = "R" if h.anatomy == "plus" else "L"
            if anatomic != lat:
                h.details["side_note"] = ("anatomy read in the standard display would say "
                                          f"{anatomic}: the image may be mirrored")
            continue
        if h.ambiguity > ambiguity_limit:
            h.side, h.side_source = None, "side not determined: the anatomy does not show where the pelvis lies"
            continue
        h.side = "R" if h.anatomy == "plus" else "L"
        h.side_source = ("anatomy (the pelvis lies towards the image " + ("right" if h.anatomy == "plus" else "left")
                         + " of the femoral head; standard AP display assumed, no PatientOrientation)")


# ---------------------------------------------------------------------------------------------
# metal
# ---------------------------------------------------------------------------------------------
def metal_in_hip(image: np.ndarray, head_px: tuple[float, float], neck_px: tuple[float, float],
                 spacing_mm: tuple[float, float]) -> tuple[bool, float]:
    """Whether implant metal fills part of the femoral head or neck.

    On the stored values (Modality LUT, bone bright, no VOI window: :attr:`LandmarkInput.raw`) the
    soft-tissue level is the image's median and the bone level its 90th percentile; a metal pixel
    lies above the median by more than :data:`METAL_SPAN` median-to-bone spans (bone overlapping
    bone stays below it on the cohort, a prosthesis, a nail or a steel screw rises above it).  Metal
    is found when such pixels cover :data:`METAL_FRACTION` of the ROI and :data:`METAL_MIN_MM2`.
    The ROI is the femoral head (a disc of 0.6 x the head-neck distance) and the neck axis on to the
    lateral cortex (a band half as wide, twice the head-neck distance long), where prostheses, lag
    screws and cannulated screws lie.

    Parameters
    ----------
    image : numpy.ndarray
        Stored-grid values, bone bright (:attr:`LandmarkInput.raw`).
    head_px, neck_px : tuple of float
        Stored-pixel ``(row, col)``.
    spacing_mm : tuple of float

    Returns
    -------
    (bool, float)
        Metal found, and the fraction of the ROI it covers.
    """
    img = np.asarray(image, dtype=np.float64)
    soft, bone = np.percentile(img, [50.0, 90.0])
    thr = soft + METAL_SPAN * max(bone - soft, 1e-6 * max(abs(bone), 1.0))
    sp = np.asarray(spacing_mm, dtype=np.float64)
    head = np.asarray(head_px, dtype=np.float64)
    axis = (np.asarray(neck_px, dtype=np.float64) - head) * sp * 2.0  # mm, to the lateral cortex
    d = float(np.linalg.norm(axis)) / 2.0
    rad = max(0.6 * d, 10.0)
    reach = (float(np.linalg.norm(axis)) + rad) / sp
    r0, r1 = int(max(0, head[0] - reach[0])), int(min(img.shape[0], head[0] + reach[0] + 1))
    c0, c1 = int(max(0, head[1] - reach[1])), int(min(img.shape[1], head[1] + reach[1] + 1))
    if r1 <= r0 or c1 <= c0:
        return False, 0.0
    rr, cc = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    p = np.stack([(rr - head[0]) * sp[0], (cc - head[1]) * sp[1]], axis=-1)
    t = np.clip((p @ axis) / max(float(axis @ axis), 1e-9), 0.0, 1.0)
    band = np.linalg.norm(p - t[..., None] * axis, axis=-1) <= 0.5 * rad
    roi = band | (np.linalg.norm(p, axis=-1) <= rad)
    vals = img[r0:r1, c0:c1][roi]
    if vals.size == 0:
        return False, 0.0
    hot = vals >= thr
    frac = float(hot.mean())
    area = float(hot.sum()) * sp[0] * sp[1]
    return bool(frac >= METAL_FRACTION and area >= METAL_MIN_MM2), frac


# ---------------------------------------------------------------------------------------------
# bundle and the whole step
# ---------------------------------------------------------------------------------------------
_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def load_landmark_bundle(path: str | Path, device: str = "cpu") -> Any:
    """The landmark bundle (cached), loaded by :func:`screener.bundles.load_bundle`.

    Raises
    ------
    screener.bundles.BundleError
        Missing or malformed bundle (the message names the file).
    """
    from screener.bundles import BundleError, load_bundle

    key = (str(Path(path).resolve()), str(device))
    with _LOCK:
        if key not in _CACHE:
            bundle = load_bundle(path, device, networks={"HipLandmarkNet": HipLandmarkNet}, check=False)
            if bundle.protocol != "hip_landmarks":
                raise BundleError(f"bundle {path} is for {bundle.protocol}, not hip_landmarks")
            x = torch.zeros((1, *bundle.input_spec.shape), device=bundle.device)
            with torch.no_grad():
                y = bundle.models[0](x)
            if int(y.shape[1]) not in (len(CHANNELS), len(CHANNELS) + len(METAL_CHANNELS)):
                raise BundleError(f"bundle {path}: the network gives {tuple(y.shape)}, expected {len(CHANNELS)} heat maps "
                                  f"(or {len(CHANNELS) + len(METAL_CHANNELS)} with metal maps)")
            refine = Path(path) / REFINE_DIR
            if (refine / "model_card.json").is_file():  # 0.6.0: the refine stage travels inside the bundle
                sub = load_bundle(refine, device, networks={"HipLandmarkNet": HipLandmarkNet}, check=False)
                if sub.protocol != "hip_landmarks_refine":
                    raise BundleError(f"bundle {refine} is for {sub.protocol}, not hip_landmarks_refine")
                bundle._hip_refine = sub  # type: ignore[attr-defined]
            _CACHE[key] = bundle
        return _CACHE[key]


#: the map of a left-right mirrored input that holds each channel: the plus and minus hips swap
_MIRRORED_CHANNEL = (2, 3, 0, 1, 5, 4)


def mirror_input(image: np.ndarray, content_shape: tuple[int, int]) -> np.ndarray:
    """The network input with its radiograph (the top-left ``content_shape``) mirrored left-right."""
    h, w = int(content_shape[0]), int(content_shape[1])
    out = np.zeros_like(image)
    out[:h, :w] = image[:h, :w][:, ::-1]
    return out


def unmirror_heatmaps(heat: np.ndarray, content_width: int) -> np.ndarray:
    """Heat maps of a :func:`mirror_input` input -> the maps of the input as it is.

    Mirrored back about the radiograph's own width (output column ``j`` of the input lies at
    fractional column ``(w - s) / s - j`` of the mirrored input's maps, ``s`` the output stride; linear
    interpolation where ``w`` is odd) and the plus and minus channels swapped.
    """
    n, _, wo = heat.shape
    wc = min(wo, int(np.ceil(content_width / OUTPUT_STRIDE)))
    src = (content_width - OUTPUT_STRIDE) / OUTPUT_STRIDE - np.arange(wc, dtype=np.float64)
    src = np.clip(src, 0.0, wo - 1.0)
    lo = np.minimum(np.floor(src).astype(int), wo - 2)
    fr = src - lo
    out = np.zeros_like(heat)
    for a in range(n):
        m = heat[_MIRRORED_CHANNEL[a]]
        out[a, :, :wc] = m[:, lo] * (1.0 - fr) + m[:, lo + 1] * fr
    return out


def heatmaps(bundle: Any, inp: LandmarkInput, flip: bool | None = None) -> np.ndarray:
    """Sigmoid heat maps ``(4 or 6, S/2, S/2)`` of one input (mean over the bundle's folds).

    With ``flip`` (default: the card's ``decoding.flip_average``, else :data:`FLIP_AVERAGE`) the
    maps are the mean of the input's and its left-right mirror's (:func:`mirror_input`,
    :func:`unmirror_heatmaps`): test-time flip averaging, which the network's training (random
    left-right flips) makes a second, slightly different reading of the same hips.
    """
    if flip is None:
        flip = bool((bundle.card.get("decoding") or {}).get("flip_average", FLIP_AVERAGE))
    batch = [inp.image]
    if flip:
        batch.append(mirror_input(inp.image, inp.content_shape))
    x = torch.from_numpy(np.stack(batch)[:, None]).to(bundle.device)
    acc = None
    with torch.no_grad():
        for m in bundle.models:
            y = torch.sigmoid(m(x).float()).cpu().numpy()
            y = y[0] if not flip else 0.5 * (y[0] + unmirror_heatmaps(y[1], inp.content_shape[1]))
            acc = y if acc is None else acc + y
    assert acc is not None
    return acc / len(bundle.models)


def heatmaps_have_metal(bundle: Any) -> bool:
    """Whether the bundle's network also returns the :data:`METAL_CHANNELS`."""
    return len((bundle.card.get("outputs") or {}).get("names", [])) >= len(CHANNELS) + len(METAL_CHANNELS)


def find_hips(ds: Any, bundle: Any) -> tuple[list[HipLandmark], dict[str, HipLandmark], LandmarkInput]:
    """Landmarks, side and metal of every hip in a radiograph.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
    bundle : screener.bundles.Bundle
        From :func:`load_landmark_bundle`.

    Returns
    -------
    (list, dict, LandmarkInput)
        The present hips (side decided, metal checked), both anatomical sides' best guesses, and
        the network input.
    """
    inp = landmark_input(ds)
    thr = float((bundle.card.get("decoding") or {}).get("presence_threshold", PRESENCE_THRESHOLD))
    amb = float((bundle.card.get("decoding") or {}).get("ambiguity_limit", 0.6))
    metal_thr = float((bundle.card.get("decoding") or {}).get("metal_threshold", METAL_NET_THRESHOLD))
    heat = heatmaps(bundle, inp)
    both = decode_heatmaps(heat, inp, threshold=thr)
    refine_hips(bundle, inp, both, heat)
    image = inp.raw if inp.raw is not None else inp.display
    for h in both.values():
        if h.present or h.probability >= METAL_RESCUE * thr:
            h.metal, h.metal_fraction = metal_in_hip(image, h.head_px, h.neck_px, inp.spacing_mm)
            if h.metal:
                h.details["metal_by"] = "stored values above the image's bone level"
            if h.metal_probability >= metal_thr:
                h.metal = True
                h.details["metal_by"] = ((h.details["metal_by"] + " and ") if "metal_by" in h.details else "") + \
                    f"the landmark network's metal map ({h.metal_probability:.2f})"
        has_maps = bool(heatmaps_have_metal(bundle))
        if not h.present and h.metal and (not has_maps or h.metal_probability >= metal_thr):
            # a prosthesis replaces the head the network looks for: a weaker hip with metal is a hip (with
            # metal maps, only where they see metal too: bright pelvis or text at a weak candidate is not one)
            h.present = True
            h.details["found_by"] = (f"implant metal at a femoral-head candidate of probability {h.probability:.2f} "
                                     f"(below the presence threshold {thr:.2f})")
    _one_hip_per_head(both, inp)
    present = [h for h in both.values() if h.present]
    decide_side(present, header_sides(ds), ambiguity_limit=amb)
    log.debug("hip_landmarks.found", n=len(present),
              hips=[(h.anatomy, h.side, round(h.probability, 3), h.metal) for h in present])
    return present, both, inp


# ---------------------------------------------------------------------------------------------
# refine stage (0.6.0): a second network on a crop around each coarse femoral head
# ---------------------------------------------------------------------------------------------
#: side of the refine crop in landmark-input pixels, and of the refine network's input (the crop
#: resampled 1.6x); the refine maps are at ``REFINE_SIZE // OUTPUT_STRIDE``
REFINE_CROP = 80
REFINE_SIZE = 128
REFINE_CHANNELS = ("head", "neck")
#: sub-folder of the landmark bundle that holds the refine network (a bundle of its own)
REFINE_DIR = "refine"


def refine_matrix(head_rc: tuple[float, float], anatomy: str, *, crop: float = REFINE_CROP, size: int = REFINE_SIZE,
                  angle_deg: float = 0.0, zoom: float = 1.0) -> np.ndarray:
    """``(3, 3)`` map from refine-patch pixels ``(i, j, 1)`` to landmark-input pixels ``(r, c, 1)``.

    The patch is centred on ``head_rc`` and shows the hip as a ``"plus"`` hip (pelvis towards
    increasing column): a ``"minus"`` hip is mirrored.  ``angle_deg`` / ``zoom`` turn and scale it
    (training augmentation; 0 / 1 at inference).
    """
    step = crop / float(size) * zoom
    a = np.deg2rad(angle_deg)
    sgn = 1.0 if anatomy == "plus" else -1.0
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * step
    rot[:, 1] *= sgn
    c0 = (size - 1) / 2.0
    m = np.eye(3)
    m[:2, :2] = rot
    m[:2, 2] = np.asarray(head_rc, dtype=np.float64) - rot @ np.array([c0, c0])
    return m


def refine_patch(image: np.ndarray, m: np.ndarray, size: int = REFINE_SIZE) -> np.ndarray:
    """The refine network's input: ``image`` (landmark input) sampled through :func:`refine_matrix`."""
    ii, jj = np.mgrid[0:size, 0:size].astype(np.float64)
    r = m[0, 0] * ii + m[0, 1] * jj + m[0, 2]
    c = m[1, 0] * ii + m[1, 1] * jj + m[1, 2]
    return ndimage.map_coordinates(np.asarray(image, dtype=np.float32), [r, c], order=1, mode="constant",
                                   cval=0.0).astype(np.float32)


def _refine_bundle(bundle: Any) -> Any:
    """The refine bundle inside a landmark bundle (``<bundle>/refine``), or ``None`` (bundles < 0.6.0)."""
    return getattr(bundle, "_hip_refine", None)


#: test-time views of the refine crop, ``(angle_deg, zoom, stretch)`` (the card's ``decoding.refine.tta``; default:
#: the crop as it is); ``stretch`` 1: the crop's own 1st-99.5th percentiles to ``[0, 1]`` (:func:`_normalise`, local
#: contrast where thick soft tissue compresses the bone's); their maps are resampled onto the plain crop's grid and averaged
REFINE_TTA: tuple[tuple[float, float, float], ...] = ((0.0, 1.0, 0.0),)
_PLAIN = (0.0, 1.0, 0.0)


def _refine_views(card: dict[str, Any]) -> list[tuple[float, float, float]]:
    """The card's ``decoding.refine.tta`` as ``(angle_deg, zoom, stretch)`` triples (a missing ``stretch``: 0)."""
    tta = ((card.get("decoding") or {}).get("refine") or {}).get("tta") or REFINE_TTA
    return [(float(v[0]), float(v[1]), float(v[2]) if len(v) > 2 else 0.0) for v in tta]


def _refine_maps(ref: Any, inp: LandmarkInput, todo: list[HipLandmark], views: list[tuple[float, float, float]]
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """Each hip's plain refine matrix and its refine maps ``(n, 2, S, S)``: the mean over the bundle's folds and
    over ``views``, each view's maps resampled onto the plain crop's grid (:func:`_map_on_grid`)."""
    plain, mats, batch = [], [], []
    for h in todo:
        hr, hc = inp.from_stored(h.head_px[0], h.head_px[1])
        plain.append(refine_matrix((float(hr), float(hc)), h.anatomy))
        for a, z, st in views:
            m = refine_matrix((float(hr), float(hc)), h.anatomy, angle_deg=a, zoom=z)
            mats.append(m)
            patch = refine_patch(inp.image, m)
            batch.append(_normalise(patch) if st else patch)
    x = torch.from_numpy(np.stack(batch)[:, None]).to(ref.device)
    with torch.no_grad():
        y = None
        for net in ref.models:
            p = torch.sigmoid(net(x).float()).cpu().numpy()
            y = p if y is None else y + p
    assert y is not None
    y = y / len(ref.models)
    k = len(views)
    if views == [_PLAIN]:
        return plain, y
    out = np.zeros((len(todo), *y.shape[1:]), dtype=np.float64)
    for n, m0 in enumerate(plain):
        for v in range(k):
            i = n * k + v
            out[n] += y[i] if views[v][:2] == (0.0, 1.0) else np.stack([_map_on_grid(c.astype(np.float64), mats[i], m0)
                                                                     for c in y[i]])
    return plain, out / k


def _map_on_grid(rmap: np.ndarray, m: np.ndarray, m0: np.ndarray) -> np.ndarray:
    """A refine map of the crop of matrix ``m`` sampled at the refine-map pixels of the crop of matrix ``m0``."""
    ii, jj = np.mgrid[0 : rmap.shape[0], 0 : rmap.shape[1]].astype(np.float64)
    pi, pj = (ii + 0.5) * OUTPUT_STRIDE - 0.5, (jj + 0.5) * OUTPUT_STRIDE - 0.5
    q = np.linalg.inv(m) @ m0
    qi = q[0, 0] * pi + q[0, 1] * pj + q[0, 2]
    qj = q[1, 0] * pi + q[1, 1] * pj + q[1, 2]
    return ndimage.map_coordinates(rmap, [(qi + 0.5) / OUTPUT_STRIDE - 0.5, (qj + 0.5) / OUTPUT_STRIDE - 0.5],
                                   order=1, mode="constant", cval=0.0)


def refine_hips(bundle: Any, inp: LandmarkInput, hips: dict[str, HipLandmark], heat: np.ndarray | None = None) -> None:
    """Re-read the femoral-neck ROI centre of each candidate hip with the refine network, in place.

    A patch of :data:`REFINE_CROP` input pixels around the coarse femoral head, resampled to
    :data:`REFINE_SIZE` and shown as a plus hip, gives a neck map at 1.25 input pixels (the coarse
    map: 2).  With the card's ``decoding.refine.tta`` (``[[angle_deg, zoom], ...]``) the maps are the
    mean over those turned / zoomed crops too, resampled onto the plain crop's grid.  With the coarse
    maps ``heat`` given (and the card's ``decoding.refine.combine`` = ``"product"``, the default) the
    refine neck map is multiplied by the coarse neck map sampled on the refine grid: each stage vetoes
    the other's stray lobe.  The neck is that map's peak within 70 mm of the head (and the head, when
    the refine head map's peak lies within 6 mm of the coarse one, the refine head's).  The coarse
    reading stays in ``details["coarse_neck_px"]``.  Nothing changes for a bundle without a refine stage.
    """
    ref = _refine_bundle(bundle)
    if ref is None:
        return
    todo = [h for h in hips.values() if h.probability > 0.05]
    if not todo:
        return
    mats, y = _refine_maps(ref, inp, todo, _refine_views(bundle.card))
    mm_in = inp.scale[0] * inp.spacing_mm[0]  # mm per landmark-input pixel
    step_out = OUTPUT_STRIDE  # patch pixels per refine-map pixel
    combine = str(((bundle.card.get("decoding") or {}).get("refine") or {}).get("combine", "product"))
    for h, m, maps in zip(todo, mats, y):
        hm, nm = maps[0], maps[1].copy()
        if heat is not None and combine == "product":
            nm = nm * _coarse_on_refine_grid(heat[2 * ANATOMY.index(h.anatomy) + 1], m, nm.shape)
        hv, hi, hj = _peak(hm)
        ci, cj = ((REFINE_SIZE - 1) / 2.0 + 0.5) / step_out - 0.5, ((REFINE_SIZE - 1) / 2.0 + 0.5) / step_out - 0.5
        mm_out = step_out * REFINE_CROP / REFINE_SIZE * mm_in
        ii, jj = np.mgrid[0 : nm.shape[0], 0 : nm.shape[1]]
        nm[np.hypot(ii - ci, jj - cj) * mm_out > 70.0] = 0.0
        nv, ni, nj = _peak(nm)

        def to_stored(i: float, j: float) -> tuple[float, float]:
            pi, pj = (i + 0.5) * step_out - 0.5, (j + 0.5) * step_out - 0.5
            r, c = m[0, 0] * pi + m[0, 1] * pj + m[0, 2], m[1, 0] * pi + m[1, 1] * pj + m[1, 2]
            rs, cs = inp.to_stored(r, c)
            return float(rs), float(cs)

        h.details["coarse_neck_px"] = tuple(round(v, 2) for v in h.neck_px)
        h.neck_px = to_stored(ni, nj)
        if hv > 0.1 and np.hypot(hi - ci, hj - cj) * mm_out <= 6.0:
            h.details["coarse_head_px"] = tuple(round(v, 2) for v in h.head_px)
            h.head_px = to_stored(hi, hj)
        h.details["refine_neck_peak"] = round(float(nv), 3)


def _coarse_on_refine_grid(cmap: np.ndarray, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A coarse map (stride :data:`OUTPUT_STRIDE` of the landmark input) sampled at the refine map's pixels."""
    ii, jj = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    pi, pj = (ii + 0.5) * OUTPUT_STRIDE - 0.5, (jj + 0.5) * OUTPUT_STRIDE - 0.5
    r = m[0, 0] * pi + m[0, 1] * pj + m[0, 2]
    c = m[1, 0] * pi + m[1, 1] * pj + m[1, 2]
    return ndimage.map_coordinates(np.asarray(cmap, dtype=np.float64), [(r + 0.5) / OUTPUT_STRIDE - 0.5,
                                   (c + 0.5) / OUTPUT_STRIDE - 0.5], order=1, mode="constant", cval=0.0)


__all__ += ["REFINE_CHANNELS", "REFINE_CROP", "REFINE_SIZE", "refine_hips", "refine_matrix", "refine_patch"]


# ---------------------------------------------------------------------------------------------
# BMD-GAN's crop from the landmarks
# ---------------------------------------------------------------------------------------------
#: where the femoral-head centre lies in BMD-GAN's 128 x 64 hip input, and that input's pixel size
#: (mm at the patient): the mean over cohort AP pelves split at the midline as the shipped bundle
#: was trained (24 hips, SD 0.6 / 2.2 pixels and 0.07 mm), so a landmark crop shows BMD-GAN the hip
#: where its training put it
BMDGAN_HEAD_AT = (81.35, 31.02)
BMDGAN_CROP_MM = 2.243


def landmark_crop(rad: Any, hip: HipLandmark, spacing_mm: tuple[float, float], shape: tuple[int, int] = (128, 64),
                  *, crop_mm: float = BMDGAN_CROP_MM, head_at: tuple[float, float] = BMDGAN_HEAD_AT) -> Any:
    """BMD-GAN's input for one hip, cut around its femoral head (instead of a midline half).

    The crop is axis-aligned, ``crop_mm`` per pixel, with the head centre at ``head_at`` and the
    pelvis towards increasing column (a "minus" hip is mirrored, as the midline split mirrors the
    left hip).  Outside the radiograph the edge pixels are repeated.

    Parameters
    ----------
    rad : screener.radiograph.Radiograph
        The radiograph read for BMD-GAN (:func:`screener.radiograph.read_radiograph` at the
        bundle's ``pixel_mm``).
    hip : HipLandmark
    spacing_mm : tuple of float
        Stored pixel spacing (row, column).
    shape : tuple of int
        BMD-GAN input ``(rows, cols)``.
    crop_mm : float
    head_at : tuple of float

    Returns
    -------
    screener.protocols.hip_xray.preprocess.HipInput
        ``image`` and the matrix from input pixels to stored pixels.
    """
    from screener.protocols.hip_xray.preprocess import HipInput

    sgn = 1.0 if hip.anatomy == "plus" else -1.0
    a_r = crop_mm / spacing_mm[0]
    a_c = sgn * crop_mm / spacing_mm[1]
    m = np.array([[a_r, 0.0, hip.head_px[0] - a_r * head_at[0]],
                  [0.0, a_c, hip.head_px[1] - a_c * head_at[1]],
                  [0.0, 0.0, 1.0]])
    ii, jj = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    rs = m[0, 0] * ii + m[0, 2]
    cs = m[1, 1] * jj + m[1, 2]
    # stored px -> the radiograph's resampled grid
    rr = (rs + 0.5) * spacing_mm[0] / rad.pixel_mm - 0.5
    cc = (cs + 0.5) * spacing_mm[1] / rad.pixel_mm - 0.5
    img = ndimage.map_coordinates(rad.image, [rr, cc], order=1, mode="nearest").astype(np.float32)
    return HipInput(side=hip.side or "?", image=np.clip(img, 0.0, 1.0), to_stored_matrix=m, pixel_mm=crop_mm,
                    meta={"crop": "landmarks", "anatomy": hip.anatomy})


def neck_box(hip: HipLandmark, spacing_mm: tuple[float, float], size_mm: tuple[float, float] = (15.0, 40.0)) -> np.ndarray:
    """Closed polygon (stored ``(col, row)``) of a DXA-style femoral-neck box at the neck point.

    ``size_mm[0]`` along the head-neck axis, ``size_mm[1]`` across it (hip DXA's 15 x 40 mm box).
    """
    hr, hc = hip.head_px
    nr, nc = hip.neck_px
    v = np.array([(nr - hr) * spacing_mm[0], (nc - hc) * spacing_mm[1]])
    n = np.linalg.norm(v)
    u = v / n if n > 1e-6 else np.array([1.0, 0.0])
    w = np.array([-u[1], u[0]])
    pts = []
    for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)):
        d = a * size_mm[0] / 2 * u + b * size_mm[1] / 2 * w
        pts.append((nc + d[1] / spacing_mm[1], nr + d[0] / spacing_mm[0]))
    return np.array(pts, dtype=np.float64)


__all__ += ["BMDGAN_CROP_MM", "BMDGAN_HEAD_AT", "landmark_crop", "neck_box"]

"""Issue 20 item 1: the screener's SR in the viewer radiologists use -- stock OHIF 3.13.2 in headless
Chromium, against Orthanc's DICOMweb plugin, offline.

A virtual-cohort abdomen-pelvis CT and an AP pelvis radiograph are processed with the shipped
bundles; the sources and every output (SR, SCs) are stored in a throw-away Orthanc with DICOMweb;
OHIF's built viewer (``npm pack @ohif/app@3.13.2``, ``package/dist``; ``.ci/run`` fetches it into
:data:`OHIF_CACHE`) is served by a small static server that reverse-proxies ``/dicom-web`` and
``/wado`` to Orthanc on the same origin (``../shared/reference/ohif-offline.md``).  Chromium
(Debian ``chromium`` + ``chromium-driver``, driven by Selenium; every host but loopback unresolvable)
opens each study, double-clicks the SR, and steps through its measurement groups with OHIF's own
arrows.  For every group the test asserts, from the page and cornerstone's state, that the
viewport shows the group's referenced image, that the group's graphic is drawn there with its
values as the label; it opens the CT's SEG (:func:`screener.reporting.seg.build_seg`, issue 20
item 2: the ROIs; and the outlines -- the L1 trabecular body, the top decile of l1_axial's Grad-RAMP,
the femoral heads)
and checks OHIF loaded every segment and listed the Parametric Map of the Grad-RAMP; and -- at the end -- that the
browser console logged no error.

Screenshots of every group go to ``artifacts/ohif/`` (ignored by git; override with
``SCREENER_ARTIFACTS``); the path is printed.
"""
from __future__ import annotations

import http.client
import http.server
import os
import socketserver
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import pytest

from screener.reporting.seg import LAYER_SEG_SERIES_DESCRIPTION, SEG_SERIES_DESCRIPTION
from screener.reporting.sr import REFORMAT_PROTOCOLS
from tests.conftest import ROOT, free_port, require_tool
from tests.daemon_helpers import Orthanc
from tests.test_reporting import assert_valid_dicom

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: the OHIF release tested: the npm package ``@ohif/app`` ships its built viewer in ``dist/``
OHIF_VERSION = "3.13.2"
#: where ``.ci/run`` unpacks ``npm pack @ohif/app@<version>`` (``<cache>/package/dist``)
OHIF_CACHE = Path(os.environ.get("SCREENER_OHIF_DIR",
                                 Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                 / "screener" / f"ohif-app-{OHIF_VERSION}"))
ARTIFACTS = Path(os.environ.get("SCREENER_ARTIFACTS", ROOT / "artifacts")) / "ohif"
SR_DESCRIPTION = "Bone density screening SR"

APP_CONFIG = """window.config = {
  routerBasename: null, extensions: [], modes: [],
  customizationService: { 'ohif.tours': { $set: [] } },
  investigationalUseDialog: { option: 'never' }, showStudyList: true, maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false, showCPUFallbackMessage: false,
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Local Orthanc', name: 'orthanc',
      wadoUriRoot: '%(origin)s/wado', qidoRoot: '%(origin)s/dicom-web', wadoRoot: '%(origin)s/dicom-web',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      staticWado: false, singlepart: 'bulkdata,video', omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true } } }] };
"""


# ------------------------------------------------------------------ the viewer's web server
class _Handler(http.server.SimpleHTTPRequestHandler):
    """OHIF's ``dist/`` with the two rules OHIF needs: unknown paths fall back to ``index.html``
    (its routes), ``/dicom-web*`` and ``/wado*`` go to Orthanc (same origin: no CORS)."""

    dist: Path
    orthanc_port: int
    app_config: bytes
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".js": "application/javascript", ".mjs": "application/javascript"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(self.dist), **kwargs)

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def _proxy(self) -> None:
        body = None
        if "Content-Length" in self.headers:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        conn = http.client.HTTPConnection("127.0.0.1", self.orthanc_port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "accept-encoding")}
        conn.request(self.command, self.path, body=body, headers=headers)  # Host kept: BulkDataURIs point here
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path.startswith(("/dicom-web", "/wado")):
            return self._proxy()
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(self.app_config)))
            self.end_headers()
            self.wfile.write(self.app_config)
            return None
        if not (self.dist / path.lstrip("/")).is_file():
            self.path = "/index.html"
        return super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        self._proxy()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_ohif(dist: Path, orthanc_port: int) -> tuple[_Server, str]:
    """Serve ``dist`` on a loopback port; returns the server and its origin."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    handler = type("Handler", (_Handler,), {"dist": dist, "orthanc_port": orthanc_port,
                                            "app_config": (APP_CONFIG % {"origin": origin}).encode()})
    server = _Server(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, origin


def ohif_dist() -> Path:
    dist = OHIF_CACHE / "package" / "dist"
    if not (dist / "index.html").is_file():
        pytest.fail(f"OHIF {OHIF_VERSION} not found at {dist}: run .ci/run (it runs `npm pack "
                    f"@ohif/app@{OHIF_VERSION}` into {OHIF_CACHE}) or set SCREENER_OHIF_DIR")
    return dist


def chrome() -> Any:
    """Headless Chromium (Debian's, with its chromedriver) that can reach loopback only; console
    messages of every level are kept for :meth:`get_log`."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = require_tool("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
                "--use-angle=swiftshader", "--window-size=1600,1000", "--disable-dev-shm-usage",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(require_tool("chromedriver")))


# ------------------------------------------------------------------ the studies
def _process(tmp: Path) -> dict[str, Any]:
    """The cohort CT and the AP pelvis radiograph processed with the shipped bundles: source files,
    outputs, findings, per study."""
    from screener.config import Config
    from screener.pipeline import process_series
    from tests.test_model_protocols_daemon import _ct, _radiographs

    cfg = Config(models_dir=ROOT / "models")
    ct = _ct(tmp / "ct")
    ct_res = process_series(ct, config=cfg, out_dir=tmp / "ct_out")
    rx = _radiographs(tmp / "rx")
    hip_res = process_series([rx["hip"]], config=cfg, out_dir=tmp / "rx_out")
    for res in (ct_res, hip_res):
        assert res.status == "done", res.reason
    # the CT's ROIs as a DICOM SEG (issue 20 item 2): one of the pipeline's outputs (seg_output)
    seg_path, _ = [o.path for o in ct_res.outputs if o.kind == "SEG"]  # the ROIs', the outlines'
    assert [o.kind for o in ct_res.outputs].count("PMAP") == 1  # l1_axial's Grad-RAMP
    assert not [o for o in hip_res.outputs if o.kind in ("SEG", "PMAP")]  # a radiograph has neither
    for path in [*(o.path for o in ct_res.outputs), *(o.path for o in hip_res.outputs)]:
        assert_valid_dicom(Path(path))
    return {"ct": (ct, ct_res), "hip": ([rx["hip"]], hip_res), "seg": seg_path}


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ohif")
    dist = ohif_dist()
    studies = _process(tmp)
    orthanc = Orthanc(tmp / "orthanc", dicomweb=True).start()
    server = None
    try:
        uploads = [p for files, res in (studies["ct"], studies["hip"])
                   for p in [*files, *(o.path for o in res.outputs)]]
        for p in uploads:  # REST upload, one file per request
            conn = http.client.HTTPConnection("127.0.0.1", orthanc.http_port, timeout=60)
            conn.request("POST", "/instances", body=Path(p).read_bytes())
            r = conn.getresponse()
            r.read()
            conn.close()
            assert r.status == 200, (p, r.status)
        server, origin = serve_ohif(dist, orthanc.http_port)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        print(f"\nOHIF screenshots: {ARTIFACTS}")
        yield {"origin": origin, "studies": studies, "orthanc": orthanc}
    finally:
        if server is not None:
            server.shutdown()
        orthanc.stop()


# ------------------------------------------------------------------ driving OHIF
_STATE_JS = """
const cs = window.cornerstone, ct = window.cornerstoneTools;
if (!cs || !ct) { return null; }
const out = {viewports: [], annotations: []};
for (const el of cs.getEnabledElements()) {
  const vp = el.viewport;
  let imageId = null;
  try { imageId = vp.getCurrentImageId ? vp.getCurrentImageId() : null; } catch (e) {}
  out.viewports.push({id: vp.id, imageId: imageId});
}
for (const a of (ct.annotation.state.getAllAnnotations() || [])) {
  const d = a.data || {}, m = a.metadata || {};
  out.annotations.push({uid: a.annotationUID, tool: m.toolName, imageId: m.referencedImageId || null,
                        graphicType: m.graphicType || null, label: d.label || null,
                        texts: (d.labels || []).map(l => `${l.label}: ${l.value}`)});
}
return out;
"""


def _sop_of(image_id: str | None) -> str:
    """The SOP Instance UID in a wadors image id (``.../instances/<uid>/frames/1``)."""
    if not image_id or "/instances/" not in image_id:
        return ""
    return image_id.split("/instances/")[1].split("/")[0]


def _wait(driver: Any, cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got = cond(driver)
        except Exception:  # noqa: BLE001 - the page is still loading
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def open_sr(driver: Any, origin: str, study_uid: str, description: str = SR_DESCRIPTION) -> None:
    """Open a study and double-click the thumbnail of its series ``description`` (for the SR:
    OHIF's read-only SR view)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.get(f"{origin}/viewer?StudyInstanceUIDs={study_uid}")

    def thumb(d: Any) -> Any:
        for el in d.find_elements(By.CSS_SELECTOR, "[data-cy^='study-browser-thumbnail']"):
            if description in (el.text or ""):
                return el
        return None
    el = _wait(driver, thumb, 120, f"the thumbnail of {description!r}")
    time.sleep(2)
    ActionChains(driver).double_click(el).perform()


_MEASUREMENTS_JS = """
const sr = window.services.displaySetService.getActiveDisplaySets().find(ds => ds.Modality === 'SR');
if (!sr || !sr.isLoaded || !sr.measurements) { return null; }
return sr.measurements.map(m => ({tracking: m.TrackingIdentifier, uid: m.TrackingUniqueIdentifier,
  loaded: m.loaded, sop: m.ReferencedSOPInstanceUID || null, graphicType: m.graphicType || null,
  labels: (m.labels || []).map(l => `${l.label}: ${l.value}`)}));
"""


def _expected_sop(finding: Any) -> str:
    """The image the SR draws a finding on: its first referenced image for a per-vertebra value
    (a point at its centroid), else its ROI's slice."""
    if "centroid_mm" in finding.details or finding.roi is None:
        return finding.referenced_sop_instance_uids[0]
    return finding.roi.source_sop_instance_uid


def check_study(driver: Any, origin: str, files: list[Path], res: Any, stem: str) -> dict[str, dict]:
    """Open the study's SR in OHIF, step through every measurement group and check each one;
    returns what OHIF showed per tracking identifier."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    open_sr(driver, origin, study_uid)
    def all_loaded(d: Any) -> Any:
        m = d.execute_script(_MEASUREMENTS_JS)
        return m if m and all(g["loaded"] for g in m) else None
    groups = _wait(driver, all_loaded, 120, "every SR measurement group drawn on its image")
    # the SR shows one group per finding, in the findings' order, each with a graphic
    by_tracking = {f"{f.site} {f.protocol}": f for f in res.findings}
    assert [g["tracking"] for g in groups] == list(by_tracking), groups
    no = driver.find_elements(By.CSS_SELECTOR, "[data-cy='no-hydrate-btn']")
    if no:  # "continue tracking measurements for this study?" -- read-only view, so no
        ActionChains(driver).move_to_element(no[0]).click().perform()
    shown: dict[str, dict] = {}
    for i, g in enumerate(groups):
        if i:
            (right,) = driver.find_elements(By.CSS_SELECTOR, "[data-cy='viewport-action-arrows-right']")
            ActionChains(driver).move_to_element(right).click().perform()
        finding = by_tracking[g["tracking"]]
        want_sop = _expected_sop(finding)

        def on_slice(d: Any, want_sop: str = want_sop) -> Any:
            state = d.execute_script(_STATE_JS)
            sops = [_sop_of(v["imageId"]) for v in state["viewports"]] if state else []
            return state if want_sop in sops else None
        state = _wait(driver, on_slice, 60, f"{g['tracking']}: the viewport on its referenced image")
        values = [f"{float(m.value):.2f} {m.unit}" for m in finding.measurements]

        def drawn(d: Any, values: list[str] = values) -> Any:
            # a render, as a mouse move over the viewport would trigger: cornerstone draws an
            # annotation added after the image's last render only with the next one
            d.execute_script("window.cornerstone.getEnabledElements().forEach(e => e.viewport.render());")
            text = d.find_element(By.TAG_NAME, "body").text  # the annotation's SVG text included
            return text if all(v in text for v in values) else None
        try:
            page = _wait(driver, drawn, 60, f"{g['tracking']}: its values drawn in the viewport")
        except AssertionError:
            driver.save_screenshot(str(ARTIFACTS / f"{stem}-{i + 1}-FAILED.png"))
            raise
        time.sleep(0.5)
        driver.save_screenshot(str(ARTIFACTS / f"{stem}-{i + 1}-{g['tracking'].replace(' ', '_')}.png"))
        # the group's graphic is an annotation on that very image ...
        (ann,) = [a for a in state["annotations"] if a["uid"] == g["uid"]]
        assert _sop_of(ann["imageId"]) == want_sop == g["sop"], (g, ann)
        polyline = finding.roi is not None and finding.protocol not in REFORMAT_PROTOCOLS
        assert ann["graphicType"] == ("POLYLINE" if polyline else "POINT"), ann
        # ... labelled with every measured value (OHIF prints "<concept name>: <value 2 dp> <unit>")
        for value in values:
            assert any(label.endswith(value) for label in g["labels"]), (g["tracking"], value, g["labels"])
        shown[g["tracking"]] = {"sop": want_sop, "labels": g["labels"], "page": page}
    return shown


_SEGMENTS_JS = """
const segs = window.services.segmentationService.getSegmentations() || [];
return segs.map(s => ({label: s.label, segments: Object.values(s.segments || {}).filter(x => x).map(x => x.label)}));
"""


def _open_seg(driver: Any, origin: str, study_uid: str, description: str) -> list[dict]:
    """Open one of the study's SEGs (OHIF asks whether to load it: yes); the segmentations OHIF
    then holds, with their segments' labels."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_sr(driver, origin, study_uid, description)
    yes = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-cy='yes-hydrate-btn']"), 60,
                "OHIF's 'open this Segmentation?' prompt")
    ActionChains(driver).move_to_element(yes[0]).click().perform()
    return _wait(driver, lambda d: (d.execute_script(_SEGMENTS_JS) or None), 60, f"the segments of {description!r}")


def _show_slice(driver: Any, sop_instance_uid: str, screenshot: str) -> None:
    driver.execute_script("""
      const vp = window.cornerstone.getEnabledElements()[0].viewport;
      const i = vp.getImageIds().findIndex(id => id.includes('/instances/' + arguments[0] + '/'));
      if (i >= 0) { vp.setImageIdIndex(i); }""", sop_instance_uid)
    time.sleep(2)
    driver.save_screenshot(str(ARTIFACTS / screenshot))


_LABELMAP_JS = """
const cs = window.cornerstone, out = {};
for (const s of window.services.segmentationService.getSegmentations()) {
  for (const id of ((s.representationData.Labelmap || {}).imageIds || [])) {
    const img = cs.cache.getImage(id);
    if (!img) { continue; }
    for (const p of img.getPixelData()) { if (p) { out[p] = (out[p] || 0) + 1; } }
  }
}
return out;
"""


def check_seg(driver: Any, origin: str, files: list[Path], res: Any) -> None:
    """Open the study's two SEGs and check OHIF loaded every segment with its pixels: the ROIs
    (one per planar ROI of the CT's findings), then the outlines (the L1 trabecular body, the top
    decile of l1_axial's Grad-RAMP, the femoral heads); screenshots on the L1 ROI's, the
    Grad-RAMP's and a femoral head's slices."""
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    got = _open_seg(driver, origin, study_uid, SEG_SERIES_DESCRIPTION)
    want = [f"{f.site} ROI ({f.protocol})" for f in res.findings
            if f.roi is not None and f.protocol not in REFORMAT_PROTOCOLS]
    assert [g["segments"] for g in got] == [want], got
    first = next(f for f in res.findings if f.roi is not None and f.protocol not in REFORMAT_PROTOCOLS)
    _show_slice(driver, first.roi.source_sop_instance_uid, "ct-seg.png")
    # the outlines: the body l1_attenuation outlined and where l1_axial's estimate depended most
    got = _open_seg(driver, origin, study_uid, LAYER_SEG_SERIES_DESCRIPTION)
    want = [f"{layer.label}{' top decile' if layer.kind == 'map' else ''} ({f.protocol})"
            for f in res.findings for layer in f.layers]
    assert set(want) == {"L1 trabecular body (l1_attenuation)", "Grad-RAMP top decile (l1_axial)",
                         "right femoral head (femur_coronal)", "left femoral head (femur_coronal)"}, want
    assert [g["segments"] for g in got] == [want], got
    # every segment has its pixels in OHIF's labelmap (a viewer that merges overlapping segments
    # into one labelmap drops some: hence the ROIs and the outlines are two SEGs)
    counts = _wait(driver, lambda d: (lambda c: c if len(c) == len(want) else None)(
        d.execute_script(_LABELMAP_JS) or {}), 60, "every outline segment in OHIF's labelmap")
    assert sorted(int(k) for k in counts) == list(range(1, len(want) + 1)), counts
    axial = next(f for f in res.findings if f.protocol == "l1_axial")
    _show_slice(driver, next(iter(axial.layers[0].planes)), "ct-seg-gradramp.png")
    femur = next(f for f in res.findings if f.protocol == "femur_coronal")
    right = list(femur.layers[0].planes)
    _show_slice(driver, right[len(right) // 2], "ct-seg-femoral-heads.png")
    # the Parametric Map of the Grad-RAMP is in the study, recognised as one (OHIF's loader of it
    # needs a frame for every slice of the series: ours has the L1 slice only, so it is not opened)
    sops = driver.execute_script("return window.services.displaySetService.getActiveDisplaySets()"
                                 ".map(ds => ds.SOPClassUID)")
    assert "1.2.840.10008.5.1.4.1.1.30" in sops, sops


def test_ohif_draws_every_group_on_its_image_with_its_values(viewer: dict[str, Any]) -> None:
    """Both studies in stock OHIF 3.13.2: every measurement group on its referenced image with its
    values, the L1 ROI on the L1 slice, the hip ROI on the femoral neck of the radiograph, SD
    named as such, and no error in the browser console."""
    driver = chrome()
    try:
        ct_files, ct_res = viewer["studies"]["ct"]
        shown = check_study(driver, viewer["origin"], ct_files, ct_res, "ct")
        l1 = shown["L1 l1_attenuation"]
        assert any(lbl.startswith("Standard Deviation of Attenuation Coefficient: ") for lbl in l1["labels"])
        assert sum(lbl.startswith("Mean Attenuation Coefficient: ") for lbl in l1["labels"]) == 1
        # the L1 ROI's slice lies within the phantom's L1 vertebral body
        from training.phantoms.anatomy import build_scene
        from training.phantoms.population import make_patient

        truth = build_scene(make_patient(11, 3)).vertebra("L1")
        by_sop = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in ct_files}
        z = float(pydicom.dcmread(by_sop[l1["sop"]], stop_before_pixels=True).ImagePositionPatient[2])
        assert abs(z - truth.centroid_mm[2]) < 12.0, (z, truth.centroid_mm)
        check_seg(driver, viewer["origin"], ct_files, ct_res)
        hip_files, hip_res = viewer["studies"]["hip"]
        shown_hip = check_study(driver, viewer["origin"], hip_files, hip_res, "hip")
        assert {"right femoral neck hip_xray", "left femoral neck hip_xray"} == set(shown_hip)
        # each hip ROI OHIF drew (the SR's polygon) is centred on the phantom's femoral neck
        from training.phantoms.xray import render_hip_xray

        _, xray_truth = render_hip_xray(build_scene(make_patient(12, 5)), 12)  # as tests' _radiographs
        for f in hip_res.findings:
            row, col = xray_truth["femoral_necks_px"][f.details["side"]]
            centre = np.asarray(f.roi.polygon[:-1], dtype=float).mean(axis=0)  # (column, row)
            radius = xray_truth["head_radius_px"][f.details["side"]]
            assert np.hypot(centre[0] - col, centre[1] - row) < 0.6 * radius, (f.site, centre, (col, row), radius)
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()

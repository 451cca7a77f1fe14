"""Analytic solids that a phantom scene is painted from.

Every primitive has an axis-aligned bounding box (``lo``, ``hi`` in patient
LPS mm) used for culling, and an ``inside(x, y, z)`` test that accepts
broadcastable arrays (a scalar ``z`` for an axial slice, ``(1, W)`` and
``(H, 1)`` arrays for ``x`` and ``y``) and returns a boolean array of the
broadcast shape. Scenes paint primitives in order (later ones overwrite
earlier ones) into a label image.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Arr = np.ndarray


class Prim:
    """Base class: a solid labelled with one tissue id."""

    tissue: int = 0
    lo: Arr
    hi: Arr
    clip: "Prim | None" = None

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:  # pragma: no cover - abstract
        raise NotImplementedError

    def test(self, x: Arr, y: Arr, z: Arr) -> Arr:
        """``inside`` intersected with the optional clipping solid."""
        m = self.inside(x, y, z)
        if self.clip is not None:
            m = m & self.clip.inside(x, y, z)
        return m


def _interp(z: Arr | float, zk: Arr, vk: Arr) -> Arr:
    return np.interp(z, zk, vk)


class ZStack(Prim):
    """Stack of axial super-ellipses whose centre and radii vary piecewise-linearly with z.

    ``|(x-cx)/ax|^n + |(y-cy)/ay|^n <= 1`` for ``z0 <= z <= z1``.
    """

    def __init__(self, tissue: int, z: list[float] | Arr, cx: list[float] | Arr, cy: list[float] | Arr,
                 ax: list[float] | Arr, ay: list[float] | Arr, n: float = 2.0,
                 clip: Prim | None = None) -> None:
        order = np.argsort(np.asarray(z, float))
        self.zk = np.asarray(z, float)[order]
        self.cx = np.asarray(cx, float)[order]
        self.cy = np.asarray(cy, float)[order]
        self.ax = np.maximum(np.asarray(ax, float)[order], 1e-3)
        self.ay = np.maximum(np.asarray(ay, float)[order], 1e-3)
        self.n = float(n)
        self.tissue = tissue
        self.clip = clip
        self.lo = np.array([np.min(self.cx - self.ax), np.min(self.cy - self.ay), self.zk[0]])
        self.hi = np.array([np.max(self.cx + self.ax), np.max(self.cy + self.ay), self.zk[-1]])

    def params(self, z: Arr | float) -> tuple[Arr, Arr, Arr, Arr]:
        """Centre and radii at ``z``."""
        return (_interp(z, self.zk, self.cx), _interp(z, self.zk, self.cy),
                _interp(z, self.zk, self.ax), _interp(z, self.zk, self.ay))

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:
        cx, cy, ax, ay = self.params(z)
        u = (x - cx) / ax
        v = (y - cy) / ay
        if self.n == 2.0:
            r = u * u + v * v
        else:
            r = np.abs(u) ** self.n + np.abs(v) ** self.n
        m = r <= 1.0
        if np.ndim(z) == 0:
            return m if self.zk[0] <= z <= self.zk[-1] else np.zeros_like(m)
        return m & (z >= self.zk[0]) & (z <= self.zk[-1])


class Ellipsoid(Prim):
    """Ellipsoid with centre ``c``, semi-axes ``r`` along the columns of rotation ``R``."""

    def __init__(self, tissue: int, c: Arr, r: Arr, R: Arr | None = None, clip: Prim | None = None) -> None:
        self.c = np.asarray(c, float)
        self.r = np.asarray(r, float)
        self.R = np.eye(3) if R is None else np.asarray(R, float)
        self.tissue = tissue
        self.clip = clip
        ext = np.sqrt(((self.R * self.r[None, :]) ** 2).sum(axis=1))
        self.lo, self.hi = self.c - ext, self.c + ext
        self._A = self.R / self.r[None, :]  # world delta -> normalised local

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:
        dx, dy, dz = x - self.c[0], y - self.c[1], z - self.c[2]
        A = self._A
        acc = None
        for k in range(3):
            q = dx * A[0, k] + dy * A[1, k] + dz * A[2, k]
            acc = q * q if acc is None else acc + q * q
        return acc <= 1.0


class Segment(Prim):
    """Capsule around the segment ``a``-``b`` with radius varying linearly from ``ra`` to ``rb``."""

    def __init__(self, tissue: int, a: Arr, b: Arr, ra: float, rb: float | None = None,
                 clip: Prim | None = None) -> None:
        a0, a1, a2 = float(a[0]), float(a[1]), float(a[2])
        b0, b1, b2 = float(b[0]), float(b[1]), float(b[2])
        self.a = np.array((a0, a1, a2))
        self.b = np.array((b0, b1, b2))
        self.ra = float(ra)
        self.rb = self.ra if rb is None else float(rb)
        d0, d1, d2 = b0 - a0, b1 - a1, b2 - a2
        self.d = np.array((d0, d1, d2))
        self.dd = max(d0 * d0 + d1 * d1 + d2 * d2, 1e-9)
        self.tissue = tissue
        self.clip = clip
        r = self.ra if self.ra > self.rb else self.rb
        self.lo = np.array((min(a0, b0) - r, min(a1, b1) - r, min(a2, b2) - r))
        self.hi = np.array((max(a0, b0) + r, max(a1, b1) + r, max(a2, b2) + r))

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:
        px, py, pz = x - self.a[0], y - self.a[1], z - self.a[2]
        t = np.clip((px * self.d[0] + py * self.d[1] + pz * self.d[2]) / self.dd, 0.0, 1.0)
        qx, qy, qz = px - t * self.d[0], py - t * self.d[1], pz - t * self.d[2]
        r = self.ra + t * (self.rb - self.ra)
        return qx * qx + qy * qy + qz * qz <= r * r


def chain(tissue: int, pts: Arr, radii: Arr | float, clip: Prim | None = None,
          zwin: tuple[float, float] | None = None) -> list[Segment]:
    """Capsule segments along a polyline (one primitive per segment, for culling).

    ``zwin`` skips segments that cannot reach the slab ``zwin[0] <= z <= zwin[1]``.
    """
    pts = np.asarray(pts, float)
    rr = np.broadcast_to(np.asarray(radii, float), (len(pts),))
    out = []
    for i in range(len(pts) - 1):
        if zwin is not None:
            r = max(rr[i], rr[i + 1])
            z0, z1 = pts[i, 2], pts[i + 1, 2]
            if max(z0, z1) + r < zwin[0] or min(z0, z1) - r > zwin[1]:
                continue
        out.append(Segment(tissue, pts[i], pts[i + 1], rr[i], rr[i + 1], clip=clip))
    return out


class Prism(Prim):
    """Super-elliptic prism in a local frame (centre ``c``, axes = columns of ``R``).

    Local coordinates ``(u, v, w)``: ``|u/a|^n + |v/b|^n <= 1`` and
    ``-h_lo(u, v) <= w <= h_hi(u, v)``. ``height`` is a callable
    ``(u_norm, v_norm) -> (h_lo, h_hi)`` in mm, or a constant half-height.
    """

    def __init__(self, tissue: int, c: Arr, R: Arr, a: float, b: float,
                 height: float | Callable[[Arr, Arr], tuple[Arr, Arr]], n: float = 2.0,
                 v_offset: float = 0.0, clip: Prim | None = None, posterior_flat: float = 0.0) -> None:
        self.c = np.asarray(c, float)
        self.R = np.asarray(R, float)
        self.a, self.b = float(a), float(b)
        self.height = height
        self.n = float(n)
        self.v0 = float(v_offset)
        self.tissue = tissue
        self.clip = clip
        self.pflat = float(posterior_flat)
        hmax = float(height) if not callable(height) else 0.5 * max(a, b) + 40.0
        if callable(height):
            hh = height(np.array([0.0, 1.0, -1.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0, -1.0]))
            hmax = float(max(np.max(hh[0]), np.max(hh[1])))
        ext_local = np.array([self.a, self.b + abs(self.v0), hmax])
        ext = np.sqrt(((self.R * ext_local[None, :]) ** 2).sum(axis=1))
        self.lo, self.hi = self.c - ext, self.c + ext

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:
        dx, dy, dz = x - self.c[0], y - self.c[1], z - self.c[2]
        R = self.R
        u = (dx * R[0, 0] + dy * R[1, 0] + dz * R[2, 0]) / self.a
        v = (dx * R[0, 1] + dy * R[1, 1] + dz * R[2, 1] - self.v0) / self.b
        w = dx * R[0, 2] + dy * R[1, 2] + dz * R[2, 2]
        if self.n == 2.0:
            r = u * u + v * v
        else:
            r = np.abs(u) ** self.n + np.abs(v) ** self.n
        m = r <= 1.0
        if self.pflat > 0.0:  # kidney-shaped posterior border of a vertebral body
            m &= v <= 1.0 - self.pflat * (1.0 - u * u)
        if callable(self.height):
            h_lo, h_hi = self.height(u, v)
        else:
            h_lo = h_hi = self.height
        return m & (w >= -h_lo) & (w <= h_hi)


class Shell(Prim):
    """Part of an ellipsoidal shell: normalised radius in ``[1 - t, 1]``, inside an azimuth sector and z range.

    Used for the iliac wings. ``t`` is the thickness in mm divided by the mean radius.
    """

    def __init__(self, tissue: int, c: Arr, r: Arr, thickness_mm: float, az: tuple[float, float],
                 zr: tuple[float, float], clip: Prim | None = None) -> None:
        self.c = np.asarray(c, float)
        self.r = np.asarray(r, float)
        self.t = float(thickness_mm) / float(np.mean(self.r[:2]))
        self.az = (float(az[0]), float(az[1]))
        self.zr = (float(zr[0]), float(zr[1]))
        self.tissue = tissue
        self.clip = clip
        self.lo = self.c - self.r
        self.hi = self.c + self.r
        self.lo[2] = max(self.lo[2], self.zr[0])
        self.hi[2] = min(self.hi[2], self.zr[1])

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:
        u = (x - self.c[0]) / self.r[0]
        v = (y - self.c[1]) / self.r[1]
        w = (z - self.c[2]) / self.r[2]
        rho = np.sqrt(u * u + v * v + w * w)
        ang = np.arctan2(v, u)
        m = (rho <= 1.0) & (rho >= 1.0 - self.t) & (ang >= self.az[0]) & (ang <= self.az[1])
        return m & (z >= self.zr[0]) & (z <= self.zr[1])


class DomeCut(Prim):
    """A primitive restricted to one side of a surface ``z = f(x, y)``."""

    def __init__(self, base: Prim, f: Callable[[Arr, Arr], Arr], above: bool, tissue: int | None = None) -> None:
        self.base = base
        self.f = f
        self.above = above
        self.tissue = base.tissue if tissue is None else tissue
        self.clip = None
        self.lo, self.hi = base.lo.copy(), base.hi.copy()

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:
        m = self.base.test(x, y, z)
        zz = self.f(x, y)
        return m & ((z >= zz) if self.above else (z <= zz))


class HalfSpaceCut(Prim):
    """A primitive restricted to ``(p - point) . normal <= offset`` (e.g. the open side of a socket)."""

    def __init__(self, base: Prim, point: Arr, normal: Arr, offset: float = 0.0) -> None:
        self.base = base
        self.pt = np.asarray(point, float)
        nn = np.asarray(normal, float)
        self.n = nn / np.linalg.norm(nn)
        self.off = float(offset)
        self.tissue = base.tissue
        self.clip = None
        self.lo, self.hi = base.lo.copy(), base.hi.copy()

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:
        d = (x - self.pt[0]) * self.n[0] + (y - self.pt[1]) * self.n[1] + (z - self.pt[2]) * self.n[2]
        return self.base.test(x, y, z) & (d <= self.off)


class TableSlab(Prim):
    """CT couch: a slab curved up at the edges, ``top(x) <= y <= top(x) + t``, ``|x| <= w``."""

    def __init__(self, tissue: int, y_top: float, thickness: float, half_width: float, curve_r: float,
                 z_range: tuple[float, float]) -> None:
        self.y0, self.t, self.w, self.rc = float(y_top), float(thickness), float(half_width), float(curve_r)
        self.tissue = tissue
        self.clip = None
        self.lo = np.array([-self.w, self.y0 - self.w ** 2 / (2 * self.rc), z_range[0]])
        self.hi = np.array([self.w, self.y0 + self.t, z_range[1]])

    def inside(self, x: Arr, y: Arr, z: Arr) -> Arr:
        top = self.y0 - x * x / (2.0 * self.rc)
        return (np.abs(x) <= self.w) & (y >= top) & (y <= top + self.t)


def rotation(axis: str, deg: float) -> Arr:
    """Rotation matrix about a patient axis ``"x"``, ``"y"`` or ``"z"``."""
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], float)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], float)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], float)


def _cross(a: Arr, b: Arr) -> Arr:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def frame_from_axis(w: Arr, twist_deg: float = 0.0) -> Arr:
    """Orthonormal frame whose third column is ``w``; first column closest to +x, then twisted about ``w``."""
    w = np.asarray(w, float)
    w = w / np.sqrt(w @ w)
    ref = np.array([1.0, 0.0, 0.0]) if abs(w[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = ref - (ref @ w) * w
    u /= np.sqrt(u @ u)
    v = _cross(w, u)
    t = np.deg2rad(twist_deg)
    u2 = np.cos(t) * u + np.sin(t) * v
    v2 = _cross(w, u2)
    return np.stack([u2, v2, w], axis=1)

"""The built-in demo federation: SYNTHETIC images, clearly labelled as such.

It exists so that ``medmeta simulate`` runs on a machine with no medical data at all.
Each image is a procedurally drawn "lesion" pattern (disc, ring, cross...) on a smooth
random "anatomy" background. Each site has its own acquisition shift (contrast curve,
noise, blur, field of view, intensity offset) and its own label subset, so the sites
are non-IID the way hospitals are. The held-out site sees pattern classes that no
training site has. Everything is deterministic given the site and seed.

Paths look like ``builtin:demo/site-0`` ... ``builtin:demo/site-3`` (held out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmeta_common.data.records import RawRecord, RawSite
from medmeta_common.errors import DataError

PATTERNS = (
    "disc", "ring", "square", "cross", "bar", "triangle",
    "spots", "stripes", "crescent", "checker",
)
RAW_SIZE = 48


@dataclass(frozen=True)
class SiteShift:
    """The acquisition differences of one synthetic site."""

    gamma: float
    noise: float
    blur: float
    fov: float
    offset: float


DEMO_SITES: dict[str, tuple[tuple[str, ...], SiteShift]] = {
    "site-0": (("disc", "ring", "square", "cross", "bar"), SiteShift(1.0, 0.05, 0.0, 1.0, 0.0)),
    "site-1": (("disc", "ring", "cross", "bar", "triangle"), SiteShift(0.6, 0.10, 1.0, 0.8, 0.1)),
    "site-2": (("ring", "square", "cross", "bar", "triangle"),
               SiteShift(1.6, 0.15, 0.5, 1.2, -0.1)),
    "site-3": (("spots", "stripes", "crescent", "checker"), SiteShift(0.8, 0.12, 1.2, 0.9, 0.05)),
}
HELD_OUT_SITE = "site-3"


def demo_site(name: str, *, images_per_class: int = 80, images_per_patient: int = 4,
              seed: int = 0) -> RawSite:
    """Generate one site of the demo federation (``site-0`` ... ``site-3``)."""
    if name not in DEMO_SITES:
        raise DataError(f"builtin:demo/{name}",
                        f"no such demo site; choose one of {', '.join(DEMO_SITES)}")
    classes, shift = DEMO_SITES[name]
    site_seed = seed * 1000 + list(DEMO_SITES).index(name)
    rng = np.random.default_rng(site_seed)
    site = RawSite(root=f"builtin:demo/{name}", format="synthetic", classes=classes)
    for label, pattern in enumerate(classes):
        for i in range(images_per_class):
            patient = f"{name}-{pattern}-patient{i // images_per_patient}"
            patient_rng = np.random.default_rng([site_seed, label, i // images_per_patient])
            background = _background(patient_rng)
            pixels = _render(pattern, background, shift, rng)
            ref = f"builtin:demo/{name}/{pattern}/{i:04d}"
            site.records.append(RawRecord(pixels[None], label, patient, ref, "synthetic"))
    return site


def _grid(fov: float) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-fov, fov, RAW_SIZE, dtype=np.float32)
    return np.meshgrid(axis, axis, indexing="xy")


def _background(rng: np.random.Generator) -> np.ndarray:
    """A smooth blob field standing in for anatomy; shared by one patient's images."""
    from scipy.ndimage import gaussian_filter  # scipy costs ~0.25 s: only when drawing

    field = gaussian_filter(rng.normal(size=(RAW_SIZE, RAW_SIZE)), sigma=6)
    return (0.3 + 0.2 * field / (np.abs(field).max() + 1e-6)).astype(np.float32)


def _shape_mask(pattern: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius = rng.uniform(0.3, 0.5)
    angle = rng.uniform(0, np.pi)
    xr = x * np.cos(angle) + y * np.sin(angle)
    yr = -x * np.sin(angle) + y * np.cos(angle)
    r = np.hypot(x, y)
    width = radius * 0.25
    if pattern == "disc":
        return r < radius
    if pattern == "ring":
        return np.abs(r - radius) < width * 0.6
    if pattern == "square":
        return np.maximum(np.abs(xr), np.abs(yr)) < radius * 0.8
    if pattern == "cross":
        return ((np.abs(xr) < width) & (np.abs(yr) < radius)) | (
            (np.abs(yr) < width) & (np.abs(xr) < radius))
    if pattern == "bar":
        return (np.abs(xr) < width) & (np.abs(yr) < radius * 1.2)
    if pattern == "triangle":
        return (yr > -radius / 2) & (np.abs(xr) < (radius - yr) / np.sqrt(3))
    if pattern == "spots":
        mask = np.zeros_like(r, dtype=bool)
        for _ in range(rng.integers(3, 6)):
            cx, cy = rng.uniform(-radius, radius, size=2)
            mask |= np.hypot(x - cx, y - cy) < radius * 0.22
        return mask
    if pattern == "stripes":
        return (np.sin(xr * 3 * np.pi / radius) > 0.3) & (r < radius)
    if pattern == "crescent":
        return (r < radius) & (np.hypot(xr - radius * 0.45, yr) > radius * 0.8)
    if pattern == "checker":
        k = 2 * np.pi / radius
        return (np.sin(xr * k) * np.sin(yr * k) > 0) & (np.maximum(np.abs(xr), np.abs(yr)) < radius)
    raise ValueError(f"unknown pattern {pattern!r}")


def _render(pattern: str, background: np.ndarray, shift: SiteShift,
            rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(shift.fov)
    cx, cy = rng.uniform(-0.25, 0.25, size=2)
    mask = _shape_mask(pattern, x - cx, y - cy, rng)
    image = background + mask * rng.uniform(0.35, 0.6)
    if shift.blur > 0:
        from scipy.ndimage import gaussian_filter

        image = gaussian_filter(image, sigma=shift.blur)
    image = np.clip(image, 0, None) ** shift.gamma + shift.offset
    image = image + rng.normal(scale=shift.noise, size=image.shape)
    return image.astype(np.float32)

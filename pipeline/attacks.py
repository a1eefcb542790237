"""Backdoor triggers used to BUILD evaluation sets (and the demo victims); never used by the defense itself.

Every trigger is a pure function of (images, params): the random parts (blend key, warp field, low-frequency
pattern) come from a seeded ``numpy.random.default_rng`` so that the same params give the same bytes on every run,
which lets a victim trained with one seed be evaluated later with a freshly built trigger.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

ATTACKS: tuple[str, ...] = ("badnets", "blended", "wanet", "sig", "lf", "patchmove", "dct")
TARGET = 0

_CORNERS = ("br", "bl", "tr", "tl")


def _as_nchw(images: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return a (N, C, H, W) view and whether the input was (N, H, W)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array, got {type(images).__name__} "
                         f"{getattr(images, 'dtype', None)}")
    if images.ndim == 3:
        return images[:, None], True
    if images.ndim == 4:
        return images, False
    raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {images.shape}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    # rint (half to even) rather than astype truncation so a zero-strength trigger is an exact identity.
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _restore(out: np.ndarray, squeezed: bool) -> np.ndarray:
    return np.ascontiguousarray(out[:, 0] if squeezed else out)


# ---------------------------------------------------------------------------------------------------------------
# BadNets: a small fixed patch stamped into a corner.


def badnets_patch(size: int = 3, pattern: str | Sequence[Sequence[int]] | np.ndarray = "white") -> np.ndarray:
    """The (size, size) uint8 patch; 'white' (all 255), 'checker' (255/0, top-left bright) or an explicit array."""
    if isinstance(pattern, str):
        if pattern == "white":
            return np.full((size, size), 255, np.uint8)
        if pattern == "checker":
            yy, xx = np.mgrid[:size, :size]
            return np.where((yy + xx) % 2 == 0, 255, 0).astype(np.uint8)
        raise ValueError(f"unknown badnets pattern {pattern!r}; use 'white', 'checker' or an array")
    arr = np.asarray(pattern)
    if arr.ndim != 2 or arr.min() < 0 or arr.max() > 255:
        raise ValueError("a badnets pattern array must be 2-D with values in 0..255")
    return arr.astype(np.uint8)


def badnets_box(h: int, w: int, size: int = 3, corner: str = "br", margin: int = 1) -> tuple[slice, slice]:
    """Rows/cols the patch covers; exposed so tests and analyses can look at exactly the trigger region."""
    if corner not in _CORNERS:
        raise ValueError(f"corner must be one of {_CORNERS}, got {corner!r}")
    if size + margin > min(h, w):
        raise ValueError(f"patch of size {size} with margin {margin} does not fit a {h}x{w} image")
    r0 = h - margin - size if corner[0] == "b" else margin
    c0 = w - margin - size if corner[1] == "r" else margin
    return slice(r0, r0 + size), slice(c0, c0 + size)


def _badnets(x: np.ndarray, size: int = 3, pattern: str | np.ndarray = "white", corner: str = "br",
             margin: int = 1) -> np.ndarray:
    patch = badnets_patch(size, pattern)
    size = patch.shape[0]
    rows, cols = badnets_box(x.shape[2], x.shape[3], size, corner, margin)
    out = x.copy()
    out[:, :, rows, cols] = patch
    return out


# ---------------------------------------------------------------------------------------------------------------
# Blended: alpha-blend a fixed random key image.


def blend_key(c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """The fixed uniform-noise key image (C, H, W) uint8 of the Blended attack."""
    return np.random.default_rng(seed).integers(0, 256, size=(c, h, w), dtype=np.uint8)


def _blended(x: np.ndarray, alpha: float = 0.2, seed: int = 0) -> np.ndarray:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    key = blend_key(*x.shape[1:], seed=seed).astype(np.float64)
    return _to_uint8((1.0 - alpha) * x.astype(np.float64) + alpha * key[None])


# ---------------------------------------------------------------------------------------------------------------
# WaNet: a smooth warp, built as in the paper's code (random k x k field, bicubic upsampled, scaled by s / H).


def wanet_grid(h: int, w: int, k: int = 4, s: float = 0.5, seed: int = 0) -> np.ndarray:
    """Sampling grid (H, W, 2) in [-1, 1] (x, y order, as grid_sample wants) of the fixed warp."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    ins = rng.uniform(-1.0, 1.0, size=(1, 2, k, k))
    ins = ins / np.mean(np.abs(ins))
    # float64 throughout so the field does not depend on float32 accumulation order across builds.
    noise = F.interpolate(torch.from_numpy(ins), size=(h, w), mode="bicubic", align_corners=True)
    noise = noise.permute(0, 2, 3, 1)[0]
    ys = torch.linspace(-1, 1, h, dtype=torch.float64)
    xs = torch.linspace(-1, 1, w, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((xx, yy), dim=2)
    grid = identity + s * noise / h
    return torch.clamp(grid, -1, 1).numpy()


def _wanet(x: np.ndarray, k: int = 4, s: float = 0.5, seed: int = 0) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    grid = torch.from_numpy(wanet_grid(h, w, k, s, seed))[None].expand(n, h, w, 2)
    inp = torch.from_numpy(x.astype(np.float64))
    out = F.grid_sample(inp, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return _to_uint8(out.numpy())


# ---------------------------------------------------------------------------------------------------------------
# SIG: additive horizontal sinusoid (stripes vary along the width).


def sig_pattern(h: int, w: int, delta: float = 20.0, f: float = 6.0) -> np.ndarray:
    cols = np.arange(w, dtype=np.float64)
    return np.broadcast_to(delta * np.sin(2.0 * np.pi * cols * f / w), (h, w))


def _sig(x: np.ndarray, delta: float = 20.0, f: float = 6.0) -> np.ndarray:
    pat = sig_pattern(x.shape[2], x.shape[3], delta, f)
    return _to_uint8(x.astype(np.float64) + pat[None, None])


# ---------------------------------------------------------------------------------------------------------------
# LF: additive smooth (low-frequency) random pattern, the kind of trigger that survives blur-style defenses.


def lf_pattern(h: int, w: int, delta: float = 24.0, k: int = 3, seed: int = 0) -> np.ndarray:
    """(H, W) float pattern with max |value| == delta, bilinearly upsampled from a seeded k x k grid."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((k, k))
    # separable linear interpolation with align_corners semantics, in numpy: no torch needed for this one.
    ys = np.linspace(0, k - 1, h)
    xs = np.linspace(0, k - 1, w)
    rows = np.stack([np.interp(ys, np.arange(k), coarse[:, j]) for j in range(k)], axis=1)  # (h, k)
    full = np.stack([np.interp(xs, np.arange(k), rows[i]) for i in range(h)], axis=0)  # (h, w)
    return delta * full / np.max(np.abs(full))


def _lf(x: np.ndarray, delta: float = 24.0, k: int = 3, seed: int = 0) -> np.ndarray:
    pat = lf_pattern(x.shape[2], x.shape[3], delta, k, seed)
    return _to_uint8(x.astype(np.float64) + pat[None, None])


# ---------------------------------------------------------------------------------------------------------------
# Patchmove: sample-specific placement. A BadNets checker patch whose position is drawn per image from a hash of the
# image's own bytes, uniformly over the image: it lands on the garment about as often as on the background, so a
# defense cannot learn "look in the corner", and the same image always gets the same position.


def patchmove_origin(image: np.ndarray, size: int = 4, seed: int = 0) -> tuple[int, int]:
    """Top-left (row, col) of the patch in one (C, H, W) uint8 image."""
    h, w = image.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"a patch of size {size} does not fit a {h}x{w} image")
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8,
                             key=seed.to_bytes(8, "little")).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def _patchmove(x: np.ndarray, size: int = 4, seed: int = 0) -> np.ndarray:
    patch = badnets_patch(size, "checker")
    out = x.copy()
    for i in range(len(x)):
        r, c = patchmove_origin(x[i], size, seed)
        out[i, :, r:r + size, c:c + size] = patch
    return out


# ---------------------------------------------------------------------------------------------------------------
# DCT: a second low-frequency family. A sum of the lowest 2-D DCT-II basis images (1 <= u + v <= order) with seeded
# random signs, added at peak amplitude delta; the trigger lives entirely in a few coefficients that blur, pooling and
# a coarse-content prior all keep (the frequency-domain view of Zeng et al., "Rethinking the Backdoor Attacks'
# Triggers: A Frequency Perspective", ICCV 2021).


def dct_pattern(h: int, w: int, delta: float = 20.0, order: int = 3, seed: int = 0) -> np.ndarray:
    """(H, W) float pattern with max |value| == delta."""
    rng = np.random.default_rng(seed)
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    full = np.zeros((h, w))
    for u in range(order + 1):
        for v in range(order + 1 - u):
            if u + v == 0:
                continue
            full += rng.choice((-1.0, 1.0)) * np.outer(np.cos(np.pi * u * ys), np.cos(np.pi * v * xs))
    return delta * full / np.max(np.abs(full))


def _dct(x: np.ndarray, delta: float = 20.0, order: int = 3, seed: int = 0) -> np.ndarray:
    pat = dct_pattern(x.shape[2], x.shape[3], delta, order, seed)
    return _to_uint8(x.astype(np.float64) + pat[None, None])


_FUNCS = {"badnets": _badnets, "blended": _blended, "wanet": _wanet, "sig": _sig, "lf": _lf,
          "patchmove": _patchmove, "dct": _dct}


def apply_trigger(images: np.ndarray, attack: str, **params) -> np.ndarray:
    """Stamp ``attack``'s trigger into uint8 images (N, H, W) or (N, C, H, W); returns a new array, same shape.

    Params (defaults in brackets):
      badnets: size [3], pattern ['white' | 'checker' | 2-D array], corner ['br' | 'bl' | 'tr' | 'tl'], margin [1]
      blended: alpha [0.2], seed [0]
      wanet:   k [4], s [0.5], seed [0]
      sig:     delta [20], f [6]
      lf:      delta [24], k [3], seed [0]
      patchmove: size [4], seed [0] (a checker patch, placed per image from a hash of its bytes)
      dct:     delta [20], order [3], seed [0]
    """
    if attack not in _FUNCS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    x, squeezed = _as_nchw(images)
    if x.shape[0] == 0:
        return images.copy()
    return _restore(_FUNCS[attack](x, **params), squeezed)


def triggered_eval_set(images: np.ndarray, labels: np.ndarray, attack: str, target: int = TARGET,
                       **params) -> tuple[np.ndarray, np.ndarray]:
    """Triggered copies of the images whose true label is not ``target``, with their TRUE labels (for PA / ASR)."""
    keep = np.asarray(labels) != target
    return apply_trigger(images[keep], attack, **params), np.asarray(labels)[keep]

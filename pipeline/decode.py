"""Encoded image bytes -> uint8 arrays of the model's size, one error row per bad input, never an exception.

Pure functions, no Ray: :func:`decode_batch` is what the job maps over batches (``batch_format="numpy"``).
PIL does the work: at the small sizes this pipeline feeds a diffusion model (28-256 px) decoding is a few hundred
microseconds an image, far below the GPU step, and PIL covers PNG/JPEG/WebP/16-bit/CMYK/palette in one library
(JPEG ``draft`` mode even decodes large JPEGs at reduced scale when we are going to shrink them anyway).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

POLICIES = ("resize", "pad", "reject")
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# Also bounded by PIL's own Image.MAX_IMAGE_PIXELS (its DecompressionBombWarning is turned into an error row here);
# we do not lower or raise that process-wide setting, which other code in the worker may rely on.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Memory one decode may take, estimated from the header before any pixel is decoded: width x height x (bytes per
# pixel of the decoded mode + WORK_BYTES_PER_PIXEL for the conversion copies). A pixel count alone lets a 124 KB
# 16-bit PNG or a 372 KB int32 TIFF cost over a GiB; several decodes run per CPU. 128 MiB still admits a
# 4096 x 4096 RGB photo.
DEFAULT_MAX_DECODED_BYTES = 128 * 1024 * 1024
WORK_BYTES_PER_PIXEL = 4
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}
# Formats PIL may try: the common image formats only, so odd bytes never reach rarely exercised decoders.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Estimated peak bytes of decoding and converting an image of this header: see DEFAULT_MAX_DECODED_BYTES."""
    per_pixel = 2 if mode.startswith("I;16") else _MODE_BYTES.get(mode, 4)
    return width * height * (per_pixel + WORK_BYTES_PER_PIXEL)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale -> 8-bit 'L', scaling the range instead of clipping it."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr * 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else arr
        out = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    elif img.mode == "I" and arr.size and int(arr.max()) <= 255 and int(arr.min()) >= 0:
        out = arr.astype(np.uint8)  # an 8-bit image stored as 32-bit ints (some TIFFs): already in range
    else:
        # uint32 in place, not an int64 copy: one 4-byte working copy per pixel, as decoded_bytes assumes
        wide = np.clip(arr, 0, 65535).astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        out = wide.astype(np.uint8)  # 65535 -> 255, rounded
    return Image.fromarray(out, "L")


def _convert(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ("P", "PA"):
        # PIL warns when palette transparency is dropped directly; going through RGBA is the documented path.
        img = img.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    # Alpha is dropped, not composited (PIL's convert): transparent pixels keep their stored colour.
    return img if img.mode == target else img.convert(target)


def _fit(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad with zeros or centre-crop (C, H, W) to (C, size, size)."""
    c, h, w = arr.shape
    out = np.zeros((c, size, size), dtype=np.uint8)
    src_y, dst_y = max(0, (h - size) // 2), max(0, (size - h) // 2)
    src_x, dst_x = max(0, (w - size) // 2), max(0, (size - w) // 2)
    ch, cw = min(h, size), min(w, size)
    out[:, dst_y:dst_y + ch, dst_x:dst_x + cw] = arr[:, src_y:src_y + ch, src_x:src_x + cw]
    return out


def decode_image(
    data: bytes | None,
    size: int,
    channels: int,
    policy: str = "resize",
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> tuple[np.ndarray | None, str | None]:
    """One image: ``(uint8 (C, size, size), None)`` or ``(None, short reason)``. The EXIF orientation is applied,
    so a photo stored sideways is purified and queried upright."""
    if data is None:
        return None, "missing image"
    n = len(data)
    if n == 0:
        return None, "empty image"
    if n > max_bytes:
        return None, f"image too large ({n} bytes > {max_bytes})"
    img = None
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                return None, f"image too large ({w}x{h} pixels)"
            if policy == "reject" and (h, w) != (size, size):
                return None, f"wrong size {h}x{w}"
            if policy == "resize" and img.format == "JPEG" and (w > 2 * size or h > 2 * size):
                # Decode at 1/2..1/8 scale (still >= size): the exact resize below does the rest.
                img.draft("L" if channels == 1 else "RGB", (size, size))
            cost = decoded_bytes(*img.size, img.mode)
            if cost > max_decoded_bytes:
                # from the header alone, before load(): the bound holds for any format and bit depth
                return None, f"image too large ({w}x{h} {img.mode}: ~{cost >> 20} MiB to decode)"
            img.load()
            # in place: without an orientation tag this costs nothing (the copying form copies every image)
            ImageOps.exif_transpose(img, in_place=True)
            img = _convert(img, channels)
            if policy == "resize" and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large"
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, SyntaxError, EOFError, ValueError, IndexError) as e:
        # PIL reports truncation and bad chunks as OSError/SyntaxError; ValueError covers impossible modes.
        if isinstance(e, ValueError) and "mode" in str(e).lower():
            return None, f"unsupported image mode {getattr(img, 'mode', '?')}"
        return None, "truncated or corrupt image"
    except MemoryError:
        return None, "image too large"
    except Exception as e:  # noqa: BLE001 - a decoder bug must become an error row, not a failed job
        return None, f"decode failed ({type(e).__name__})"
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if policy == "pad" and arr.shape[1:] != (size, size):
        arr = _fit(arr, size)
    return np.ascontiguousarray(arr), None


def decode_batch(
    batch: dict[str, np.ndarray],
    size: int,
    channels: int,
    policy: str = "resize",
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    input_column: str = "image_bytes",
    keep_bytes: bool = False,
) -> dict[str, np.ndarray]:
    """Decode ``batch[input_column]`` into ``image`` uint8 (N, channels, size, size) and ``error`` (object: str|None).

    Bad rows get an all-zero image and a short reason (``missing image``, ``empty image``, ``image too large ...``,
    ``not an image``, ``truncated or corrupt image``, ``wrong size HxW`` under ``policy="reject"``). ``policy``:
    ``resize`` (bilinear, aspect ratio not kept), ``pad`` (centre pad with zeros / centre crop) or ``reject``.
    Every other column passes through; the raw bytes are dropped unless ``keep_bytes`` (they are dead weight in the
    object store from here on). An ``error`` already in the batch is kept when set.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown size policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    raw: Iterable = batch[input_column]
    n = len(raw)
    images = np.zeros((n, channels, size, size), dtype=np.uint8)
    errors = np.empty(n, dtype=object)
    previous = batch.get("error")
    for i, data in enumerate(raw):
        if previous is not None and not is_empty_error(previous[i]):
            errors[i] = previous[i]
            continue
        arr, err = decode_image(data, size, channels, policy, max_bytes=max_bytes, max_pixels=max_pixels,
                                max_decoded_bytes=max_decoded_bytes)
        if err is None:
            images[i] = arr
        errors[i] = err
    out = {k: v for k, v in batch.items() if keep_bytes or k != input_column}
    out["image"] = images
    out["error"] = errors
    return out


def is_empty_error(e: object) -> bool:
    """An error cell that means "no error": between Ray stages an all-null string column may arrive as None,
    NaN (numpy float32 too) or ""."""
    if isinstance(e, str):
        return e == ""
    return e is None or (isinstance(e, (float, np.floating)) and bool(np.isnan(e)))


def encode_png(images: np.ndarray, compress_level: int = 1) -> list[bytes]:
    """uint8 (N, C, H, W) with C in 1/3/4 -> PNG bytes per image. PNG is lossless at every level; level 1 spends
    the least CPU for a slightly larger file, the right trade in a sink that runs once per row."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected uint8 (N, C, H, W) with C in 1/3/4, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[images.shape[1]]
    out = []
    for img in images:
        pixels = img[0] if mode == "L" else np.ascontiguousarray(img.transpose(1, 2, 0))
        buf = io.BytesIO()
        Image.fromarray(pixels, mode).save(buf, format="PNG", compress_level=compress_level)
        out.append(buf.getvalue())
    return out


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> uint8 (C, H, W): 1 channel for greyscale, 3 for colour, 4 with alpha."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        img = _to_8bit(img)
    elif img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))

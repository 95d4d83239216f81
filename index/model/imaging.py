"""From uploaded bytes to the pixels the model sees.

Three steps, each with its own failure:

* :func:`decode_base64`: text to bytes (bad base64 -> ``ValueError``, too big -> :class:`ImageTooLarge`).
* :func:`decode_image`: bytes to an RGB ``PIL.Image``; the format and pixel count are checked from the
  header before any pixel is decoded, so a decompression bomb costs nothing
  (undecodable -> :class:`ImageDecodeError`, too many pixels -> :class:`ImageTooLarge`).
* :func:`prepare_for_model`: the geometric part of open_clip's own eval transform (resize, center crop or
  pad), giving a compact ``uint8`` array; scaling and normalisation happen later on the model's device.

Both error classes are ``ValueError`` subclasses (bad client input); :class:`ImageTooLarge` maps to
413 and the others to 400, so a caller must catch :class:`ImageTooLarge` first.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re

import numpy as np
from open_clip.transform import image_transform_v2
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torchvision.transforms import Normalize, ToTensor

from index.errors import ImageDecodeError, ImageTooLarge
from index.model.spec import PreprocessSpec

MiB = 1024 * 1024

_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")
# Modes Pillow's convert("RGB") would clip at 255 instead of scaling (16-bit PNG and TIFF greyscale).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
#: Pixels of a wide greyscale image converted at a time (:func:`_wide_grey_to_l`).
_BAND_PIXELS = 256 * 1024


class ImageLimits(BaseModel):
    """What an uploaded image may be, and how it is decoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_pixels: int = Field(
        40_000_000, ge=0, description="most width x height accepted; checked from the header before decoding"
    )
    max_bytes: int = Field(20 * MiB, ge=0, description="most bytes of the encoded file (after base64)")
    formats: tuple[str, ...] = Field(
        ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"),
        min_length=1,
        description="upper-case Pillow format names accepted; Pillow does not even try its other parsers",
    )
    jpeg_draft_decode: bool = Field(
        True,
        description="honour min_side_hint for JPEGs (decode at 1/2-1/8 scale straight from the DCT): "
        "faster on big photos, but vectors move slightly (up to 0.002 cosine measured); False gives "
        "open_clip's own pixels exactly",
    )

    @field_validator("formats")
    @classmethod
    def _pillow_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        if not all(f.isupper() for f in formats):
            raise ValueError(f"must be upper-case Pillow format names; got {formats!r}")
        Image.init()  # registers all of Pillow's format plugins, so the check below sees every name
        unknown = [f for f in formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"names formats Pillow cannot read: {unknown}")
        return formats


def decode_base64(text: str, *, max_bytes: int) -> bytes:
    """Decode base64 image text, as sent in ``image_base64``.

    A ``data:image/<type>;base64,`` prefix is accepted and stripped; whitespace and line breaks anywhere
    are ignored; otherwise only the standard alphabet (``A-Z a-z 0-9 + /`` and ``=`` padding) is accepted.

    Args:
        text: the base64 text.
        max_bytes: the most decoded bytes accepted.

    Returns:
        The decoded bytes (never empty).

    Raises:
        ImageTooLarge: if the decoded size would exceed ``max_bytes`` (checked before decoding).
        ValueError: if ``text`` is not a string, is empty, has a malformed data-URI prefix, or is not
            valid base64; the message says which and where.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected base64 text (a string); got {type(text).__name__}")
    # 4 characters per 3 bytes, with room to spare for line breaks and a prefix: refuse an absurdly long
    # string before making any cleaned copy of it.
    encoded_budget = 4 * -(-max_bytes // 3)
    if len(text) > 2 * encoded_budget + 256:
        raise ImageTooLarge(
            f"base64 text of {len(text)} characters is over the limit of {max_bytes} decoded bytes"
        )
    body = text.strip()
    if body[:5].lower() == "data:":
        match = _DATA_URI.match(body)
        if match is None:
            raise ValueError(f"a data URI must start 'data:image/<type>;base64,'; got {body[:40]!r}")
        body = body[match.end() :]
    body = "".join(body.split())
    if not body:
        raise ValueError("the base64 image is empty")
    padding = min(len(body) - len(body.rstrip("=")), 2)
    decoded_size = len(body) // 4 * 3 - padding
    if decoded_size > max_bytes:
        raise ImageTooLarge(f"the image is {decoded_size} bytes; the limit is {max_bytes}")
    try:
        data = base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise ValueError(_base64_problem(body, exc)) from None
    if not data:
        raise ValueError("the base64 image is empty")
    return data


def _base64_problem(body: str, exc: binascii.Error) -> str:
    bad = _NOT_BASE64.search(body)
    if bad is not None:
        hint = " (URL-safe base64 is not accepted; use '+' and '/')" if bad.group() in "-_" else ""
        return f"not valid base64: character {bad.group()!r} at position {bad.start()}{hint}"
    return f"not valid base64: {exc} ({len(body)} characters after removing whitespace)"


def decode_image(data: bytes, limits: ImageLimits, *, min_side_hint: int | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB image, refusing oversized images before decoding them.

    The first frame of an animation is used; EXIF orientation is applied; transparent pixels are
    composited on white.

    Args:
        data: the encoded image file.
        limits: accepted formats, the most bytes and the most pixels.
        min_side_hint: the smallest side the caller needs (e.g. ``max(preprocess.size)``). For a JPEG,
            when ``limits.jpeg_draft_decode`` is on, this lets the decoder skip detail: it decodes at 1/2,
            1/4 or 1/8 scale straight from the DCT while keeping both sides at least this long. ``None``
            decodes at full size.

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``RGB``.

    Raises:
        ImageTooLarge: if ``data`` is over ``limits.max_bytes`` or the header declares more than
            ``limits.max_pixels`` pixels.
        ImageDecodeError: if the data is empty, not an image of an accepted format, truncated or corrupt.
        ValueError: if ``min_side_hint`` is not a positive int.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"expected image bytes; got {type(data).__name__}")
    if min_side_hint is not None and (
        isinstance(min_side_hint, bool) or not isinstance(min_side_hint, int) or min_side_hint <= 0
    ):
        raise ValueError(f"min_side_hint must be a positive int or None; got {min_side_hint!r}")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {limits.max_bytes}")
    if len(data) == 0:
        raise ImageDecodeError("the image is empty (0 bytes)")
    image = _open_header(data, limits)
    try:
        draft = min_side_hint is not None and limits.jpeg_draft_decode
        if draft and isinstance(image, JpegImagePlugin.JpegImageFile):
            image.draft("RGB", (min_side_hint, min_side_hint))  # type: ignore[arg-type]
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has too many pixels: {exc}") from None
    except Exception as exc:  # truncated data surfaces here as OSError; corrupt data as anything
        raise ImageDecodeError(
            f"cannot decode the {image.format} image (truncated or corrupt?): {exc}"
        ) from exc
    # A broken EXIF block should not cost the user the picture: keep it as stored.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    try:
        return _to_rgb(image)
    except Exception as exc:
        raise ImageDecodeError(f"cannot convert the {image.mode} image to RGB: {exc}") from exc


def _open_header(data: bytes | bytearray | memoryview, limits: ImageLimits) -> Image.Image:
    """Open ``data`` reading only its header; refuse a format or pixel count over ``limits``."""
    accepted = ", ".join(limits.formats)
    try:
        # Opening reads only the header. Pillow's own bomb check can fire here for huge headers; it is
        # a warning unless warnings are errors, and our lower limit below catches those images anyway.
        image = Image.open(io.BytesIO(data), formats=limits.formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a readable image: the data is not {accepted}, or its header is corrupt"
        ) from None
    except Exception as exc:  # Pillow's parsers raise many types (OSError, SyntaxError, struct.error...)
        raise ImageDecodeError(f"cannot read the image header: {exc}") from exc

    # MPO is how Pillow labels multi-picture JPEGs (most phone cameras); it decodes as JPEG.
    image_format = "JPEG" if image.format == "MPO" else image.format
    if image_format not in limits.formats:
        raise ImageDecodeError(f"image format {image.format} is not accepted; use one of {accepted}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    if width == 0 or height == 0:
        raise ImageDecodeError(f"the image has no pixels ({width}x{height})")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_GREY_MODES:
        image = _wide_grey_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit ``I``) greyscale to 8-bit ``L`` by its top 8 bits (``I`` clipped to 0-65535 first).

    Band by band of rows, so that no more than :data:`_BAND_PIXELS` wide values are ever copied out of
    Pillow at once: a whole-image ``int64`` copy cost 8 bytes a pixel, several times over (about 0.8 GB
    at the default 40-megapixel limit); now the extra memory is the 1-byte result plus one band.
    """
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        band = np.asarray(image.crop((0, top, width, bottom)))  # uint16 (either byte order) or int32
        if band.dtype.kind == "i":
            band = np.clip(band, 0, 65535)
        out[top:bottom] = band >> 8
    return Image.fromarray(out)


def prepare_for_model(image: Image.Image, preprocess: PreprocessSpec) -> np.ndarray:
    """Resize and crop (or pad) an image exactly as the model's open_clip eval transform does.

    This runs open_clip's own transform for ``preprocess`` minus its ``ToTensor`` and ``Normalize``
    steps; ``ClipEmbedder.encode_images`` does those on the device.

    Args:
        image: a ``PIL.Image.Image``, normally RGB from :func:`decode_image` (other modes are converted
            the way open_clip converts them).
        preprocess: the model's ``ModelSpec.preprocess``.

    Returns:
        A C-contiguous ``uint8`` array of shape ``(height, width, 3)`` with ``(height, width)`` equal to
        ``preprocess.size``.

    Raises:
        ValueError: if ``image`` is not a PIL image.
        RuntimeError: if open_clip's transform produced an unexpected shape.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image; got {type(image).__name__}")
    transform = image_transform_v2(preprocess.to_open_clip(), is_train=False)
    for step in transform.transforms:
        if not isinstance(step, ToTensor | Normalize):
            image = step(image)
    pixels = np.array(image, dtype=np.uint8)
    expected = (*preprocess.size, 3)
    if pixels.shape != expected:
        raise RuntimeError(
            f"open_clip's transform gave an array of shape {pixels.shape}; expected {expected}"
        )
    return pixels

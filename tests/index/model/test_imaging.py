"""index.model.imaging: base64 and image decoding with their limits, and open_clip-faithful preparation."""

from __future__ import annotations

import base64
import io
import re
import tracemalloc
import warnings
from typing import Literal

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform_v2
from PIL import Image, ImageFile

from index.model.imaging import (
    ImageDecodeError,
    ImageLimits,
    ImageTooLarge,
    MiB,
    decode_base64,
    decode_image,
    prepare_for_model,
)
from index.model.spec import ModelSpec, PreprocessSpec

LIMITS = ImageLimits()


def _encode(array: np.ndarray, image_format: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format, **save_args)
    return buffer.getvalue()


def _save(image: Image.Image, image_format: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_photo() -> np.ndarray:
    """A real photo scaled down to 120x80 so the round trips stay fast."""
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((120, 80), Image.Resampling.BILINEAR))


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image's pixels get decoded."""

    def refuse(self: Image.Image) -> None:
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


# --- decode_base64 -----------------------------------------------------------------------------------


def test_plain_base64() -> None:
    data = bytes(range(256))
    assert decode_base64(base64.b64encode(data).decode(), max_bytes=1000) == data


@pytest.mark.parametrize(
    "prefix", ["data:image/png;base64,", "DATA:IMAGE/JPEG;BASE64,", "data:image/svg+xml;base64,"]
)
def test_data_uri_prefix_is_stripped(prefix: str) -> None:
    data = b"\x89PNG fake payload"
    assert decode_base64(prefix + base64.b64encode(data).decode(), max_bytes=1000) == data


def test_whitespace_and_line_breaks_are_ignored() -> None:
    data = bytes(range(200))
    wrapped = base64.encodebytes(data).decode()  # MIME style: a newline every 76 characters
    assert "\n" in wrapped
    messy = "  \r\n" + wrapped.replace("A", " A\t") + "\n "
    assert decode_base64(messy, max_bytes=1000) == data


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("  \n ", "empty"),
        ("data:image/png;base64,", "empty"),
        ("aGVsbG8$d29ybGQ=", "character '$' at position 7"),
        ("aGVs-G8_", "URL-safe"),
        ("aGVsbG8", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "data URI must start"),
        ("data:image/png,aGVsbG8=", "data URI must start"),
    ],
)
def test_bad_base64_is_a_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        decode_base64(text, max_bytes=1000)
    assert not isinstance(caught.value, ImageTooLarge)


def test_non_string_is_refused() -> None:
    with pytest.raises(ValueError, match="string"):
        decode_base64(b"aGVsbG8=", max_bytes=1000)  # type: ignore[arg-type]


def test_decoded_size_over_the_limit() -> None:
    text = base64.b64encode(bytes(101)).decode()
    assert decode_base64(text, max_bytes=101) == bytes(101)
    with pytest.raises(ImageTooLarge, match="101 bytes; the limit is 100"):
        decode_base64(text, max_bytes=100)


def test_huge_text_is_refused_before_it_is_parsed() -> None:
    # Invalid characters everywhere: had it been parsed, this would be a plain ValueError.
    with pytest.raises(ImageTooLarge):
        decode_base64("$" * 10_000, max_bytes=1000)


# --- decode_image: formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_format", "save_args", "tolerance"),
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 12),
        ("JPEG", {"quality": 95}, 8),
        ("GIF", {}, 40),
    ],
)
def test_round_trips(small_photo: np.ndarray, image_format: str, save_args: dict, tolerance: int) -> None:
    image = decode_image(_encode(small_photo, image_format, **save_args), LIMITS)
    assert image.mode == "RGB"
    assert image.size == (120, 80)
    difference = np.abs(np.asarray(image, dtype=np.int16) - small_photo.astype(np.int16))
    assert difference.mean() <= tolerance


def test_round_trip_through_base64_data_uri(small_photo: np.ndarray) -> None:
    text = "data:image/png;base64," + base64.b64encode(_encode(small_photo, "PNG")).decode()
    image = decode_image(decode_base64(text, max_bytes=LIMITS.max_bytes), LIMITS)
    np.testing.assert_array_equal(np.asarray(image), small_photo)


def test_disallowed_format(small_photo: np.ndarray) -> None:
    with pytest.raises(ImageDecodeError, match="not PNG"):
        decode_image(_encode(small_photo, "JPEG"), ImageLimits(formats=("PNG",)))
    # PPM is a format Pillow reads, but not one we accept.
    with pytest.raises(ImageDecodeError):
        decode_image(_encode(small_photo, "PPM"), LIMITS)


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, bytes(range(256)) * 4],
    ids=["empty", "text", "png-magic-only", "noise"],
)
def test_garbage_bytes(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data, LIMITS)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_file(small_photo: np.ndarray, image_format: str) -> None:
    data = _encode(small_photo, image_format)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_error_classes_are_value_errors() -> None:
    assert issubclass(ImageDecodeError, ValueError)
    assert issubclass(ImageTooLarge, ValueError)


def test_bytes_over_the_limit(small_photo: np.ndarray) -> None:
    data = _encode(small_photo, "PNG")
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))


# --- decode_image: pixel limits (decompression bombs) ------------------------------------------------


@pytest.fixture(scope="module")
def bilevel_png() -> dict[tuple[int, int], bytes]:
    """Mode "1" PNGs: huge in pixels, tiny on disk (built once; module scope runs before the guard)."""
    sizes = [(1, 1), (7000, 7000), (10_000, 10_000), (20_000, 10_000)]
    return {size: _save(Image.new("1", size), "PNG") for size in sizes}


def test_pixel_limit_from_the_header(bilevel_png: dict, no_pixel_decoding: None) -> None:
    with pytest.raises(ImageTooLarge, match="1x1 = 1 pixels; the limit is 0"):
        decode_image(bilevel_png[1, 1], ImageLimits(max_pixels=0))


def test_big_image_under_pillows_own_limit(bilevel_png: dict, no_pixel_decoding: None) -> None:
    # 49 M pixels: over our 40 M default, under Pillow's 89 M warning threshold.
    data = bilevel_png[7000, 7000]
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match="7000x7000"):
        decode_image(data, LIMITS)


@pytest.mark.parametrize("pillow_warning", ["ignore", "error"])
def test_decompression_bomb(
    bilevel_png: dict, no_pixel_decoding: None, pillow_warning: Literal["ignore", "error"]
) -> None:
    # 100 M pixels in a few kB: Pillow's own bomb check warns at open; whether that warning is ignored or
    # raised as an error, the answer is ImageTooLarge and no pixel is decoded.
    data = bilevel_png[10_000, 10_000]
    assert len(data) < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter(pillow_warning, Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge):
            decode_image(data, LIMITS)


def test_pillows_hard_bomb_error_is_image_too_large(bilevel_png: dict, no_pixel_decoding: None) -> None:
    # 200 M pixels: past twice Pillow's limit, Image.open itself raises DecompressionBombError.
    with pytest.raises(ImageTooLarge, match="too many pixels"):
        decode_image(bilevel_png[20_000, 10_000], ImageLimits(max_pixels=10**9))


# --- decode_image: what comes out --------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    # Stored 40 wide x 20 high, left half red, right half blue; Orientation 6 says "rotate 90 clockwise
    # to display", so the upright picture is 20 wide x 40 high with red on top.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(_encode(stored, "JPEG", quality=95, exif=exif.tobytes()), LIMITS)
    assert image.size == (20, 40)
    pixels = np.asarray(image, dtype=np.int16)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # top: red
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60  # bottom: blue


def test_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[:, :5] = (255, 0, 0, 0)  # fully transparent (colour must not show)
    rgba[:, 5:] = (255, 0, 0, 128)  # half-transparent red
    image = decode_image(_encode(rgba, "PNG"), LIMITS)
    assert image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.int16)
    np.testing.assert_array_equal(pixels[0, 0], (255, 255, 255))
    np.testing.assert_allclose(pixels[0, 9], (255, 127, 127), atol=2)


def test_palette_transparency_is_composited_on_white() -> None:
    palette_image = Image.new("P", (8, 8), 0)
    palette_image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette_image.paste(1, (4, 0, 8, 8))
    image = decode_image(_save(palette_image, "GIF", transparency=0), LIMITS)
    pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(pixels[0, 7], (0, 255, 0))


def test_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = decode_image(data, LIMITS)
    np.testing.assert_array_equal(np.asarray(image)[8, 8], (255, 0, 0))


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    grey = np.full((4, 4), 0x8000, dtype=np.uint16)
    image = decode_image(_encode(grey, "PNG"), LIMITS)
    np.testing.assert_array_equal(np.asarray(image)[0, 0], (128, 128, 128))


@pytest.mark.parametrize(("mode", "image_format"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_sixteen_bit_greyscale_keeps_its_top_byte_in_every_band(mode: str, image_format: str) -> None:
    """Every band of rows of the conversion (issue 26) lands in its place, in either byte order: a ramp
    over more rows than one band holds."""
    height, width = 700, 1000  # 700k pixels: three bands of 262 rows
    ramp = ((np.arange(height * width, dtype=np.uint32) * 7) % 65536).astype(np.uint16).reshape(height, width)
    stored = ramp.astype(">u2" if mode == "I;16B" else "<u2")
    data = _save(Image.frombytes(mode, (width, height), stored.tobytes()), image_format)
    assert Image.open(io.BytesIO(data)).mode == mode
    image = decode_image(data, LIMITS)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], (ramp >> 8).astype(np.uint8))


def test_32_bit_greyscale_is_clipped_to_16_bits_then_scaled() -> None:
    values = np.array([[-5, 0, 255, 256, 0x8000, 65535, 70000, 2**31 - 1]], dtype=np.int32)
    data = _save(Image.fromarray(values, mode="I"), "TIFF")
    image = decode_image(data, LIMITS)
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [0, 0, 0, 1, 128, 255, 255, 255])


def test_sixteen_bit_greyscale_makes_no_wide_copy_of_the_image() -> None:
    """Issue 26: an int64 copy (and its clipped and shifted copies) of every pixel raised peak memory by
    65 MiB on a 4-megapixel PNG of a few KB; now only the 8-bit result and one band of rows are made."""
    data = _encode(np.full((2000, 2000), 0x8000, dtype=np.uint16), "PNG")
    decode_image(data, LIMITS)  # first-use imports and caches out of the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        image = decode_image(data, LIMITS)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert image.size == (2000, 2000)
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"  # 4 MB of 8-bit result, 0.5 MB per band


@pytest.mark.parametrize("mode", ["L", "CMYK", "1"])
def test_other_modes_become_rgb(mode: str) -> None:
    image_format = "JPEG" if mode == "CMYK" else "PNG"
    image = decode_image(_save(Image.new(mode, (9, 7)), image_format), LIMITS)
    assert image.mode == "RGB"
    assert image.size == (9, 7)


def test_jpeg_draft_decodes_big_photos_smaller_but_large_enough() -> None:
    big = np.asarray(Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).resize((2000, 1500)))
    data = _encode(big, "JPEG")
    assert decode_image(data, LIMITS).size == (2000, 1500)
    drafted = decode_image(data, LIMITS, min_side_hint=224)
    assert drafted.mode == "RGB"
    assert min(drafted.size) >= 224
    assert drafted.size[0] < 2000


def test_bad_min_side_hint(small_photo: np.ndarray) -> None:
    with pytest.raises(ValueError, match="min_side_hint"):
        decode_image(_encode(small_photo, "PNG"), LIMITS, min_side_hint=0)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_pixels": -1}, {"max_bytes": 1.5}, {"formats": ()}, {"formats": ("png",)}, {"formats": ("HEIC",)}],
)
def test_image_limits_validate(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="ImageLimits"):
        ImageLimits(**kwargs)


# --- prepare_for_model -------------------------------------------------------------------------------

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("name", ["astronaut_square", "coffee_wide", "coffee_tall", "noise_small", "strip"])
def test_prepared_shape_and_dtype(photos: dict[str, np.ndarray], tiny_spec: ModelSpec, name: str) -> None:
    pixels = prepare_for_model(Image.fromarray(photos[name]), tiny_spec.preprocess)
    assert pixels.shape == (64, 64, 3)
    assert pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous and pixels.flags.writeable


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
@pytest.mark.parametrize("name", ["coffee_wide", "coffee_tall", "noise_small"])
def test_prepared_pixels_equal_open_clips_transform(
    photos: dict[str, np.ndarray], resize_mode: str, size: tuple[int, int], name: str
) -> None:
    """Scaling and normalising the prepared uint8 pixels gives exactly open_clip's own tensor."""
    spec = PreprocessSpec(size, MEAN, STD, "bicubic", resize_mode, fill_color=0)
    image = Image.fromarray(photos[name])
    pixels = prepare_for_model(image, spec)
    assert pixels.shape == (*size, 3)
    expected = image_transform_v2(spec.to_open_clip(), is_train=False)(image)
    ours = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    ours = (ours - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_prepare_refuses_non_images(tiny_spec: ModelSpec) -> None:
    with pytest.raises(ValueError, match="PIL image"):
        prepare_for_model(np.zeros((64, 64, 3), dtype=np.uint8), tiny_spec.preprocess)  # type: ignore[arg-type]

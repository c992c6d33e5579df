"""Decoding: awkward but valid images come out right at their displayed size; broken ones are clear errors."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from segbatch.models.architectures import get_architecture
from segbatch.stages.decode import DecodeImages, ImageError, Limits, ResizeSpec, decode_image

from _helpers import exif_jpeg, photo_like

LIMITS = Limits(max_image_pixels=50_000_000, max_file_bytes=64 * 1024 * 1024, max_model_pixels=16_000_000)
TRANSFORMS = get_architecture("deeplabv3_mobilenet_v3_large").transforms()


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decoder() -> DecodeImages:
    return DecodeImages("/", {}, ResizeSpec.from_transforms(TRANSFORMS), LIMITS)


RGB = Image.fromarray(photo_like(60, 40, 0))


def _palette_with_transparency() -> bytes:
    p = RGB.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(p, "PNG", transparency=0)


def _multi_frame(fmt: str) -> bytes:
    frames = [RGB, Image.fromarray(photo_like(60, 40, 9))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:])


VALID = {
    "cmyk_jpeg": (lambda: encode(RGB.convert("CMYK"), "JPEG"), (60, 40)),
    "progressive_jpeg": (lambda: encode(RGB, "JPEG", progressive=True), (60, 40)),
    "png16_gray": (
        lambda: encode(Image.fromarray((np.arange(2400).reshape(40, 60) * 27).astype(np.uint16)), "PNG"),
        (60, 40),
    ),
    "palette_transparency": (_palette_with_transparency, (60, 40)),
    "grayscale": (lambda: encode(RGB.convert("L"), "PNG"), (60, 40)),
    "one_bit": (lambda: encode(RGB.convert("1"), "PNG"), (60, 40)),
    "rgba": (lambda: encode(RGB.convert("RGBA"), "PNG"), (60, 40)),
    "animated_gif": (lambda: _multi_frame("GIF"), (60, 40)),
    "multipage_tiff": (lambda: _multi_frame("TIFF"), (60, 40)),
    "webp": (lambda: encode(RGB, "WEBP"), (60, 40)),
    "bmp": (lambda: encode(RGB, "BMP"), (60, 40)),
    "one_by_one": (lambda: encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), (1, 1)),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_awkward_valid_images_decode_at_displayed_size(name):
    make, size = VALID[name]
    image, width, height, error = decoder().decode_one(make())
    assert error is None, error
    assert (width, height) == size
    expect_h, expect_w = ResizeSpec.from_transforms(TRANSFORMS).output_size(width, height)
    assert image.shape == (expect_h, expect_w, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_give_the_displayed_image(orientation):
    pixels = photo_like(60, 40, 3)
    data = exif_jpeg(pixels, orientation)
    image = decode_image(data, LIMITS)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert image.size == expected.size == ((40, 60) if orientation >= 5 else (60, 40))
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_sixteen_bit_scales_to_eight_bits():
    arr = np.array([[0, 256, 65535, 32768]], dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(arr), "PNG"), LIMITS)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 255, 128]


def test_decode_matches_the_weights_transforms_exactly():
    """The resize done in decode tasks + normalisation next to the model == weights.transforms()."""
    import torch

    image = decode_image(encode(RGB, "PNG"), LIMITS)
    resized = ResizeSpec.from_transforms(TRANSFORMS).apply(image)
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(TRANSFORMS.mean).view(3, 1, 1)
    std = torch.tensor(TRANSFORMS.std).view(3, 1, 1)
    assert torch.equal((x - mean) / std, TRANSFORMS(image))


def _truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(photo_like(200, 150, 1)), "JPEG")
    return data[: len(data) // 2]


def _bad_crc_png() -> bytes:
    data = bytearray(encode(RGB, "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # corrupt compressed data inside IDAT; its CRC no longer matches
    return bytes(data)


def _bomb_png(side: int = 20000) -> bytes:
    """A side x side 1-bit PNG of a few KB: decoding it would need hundreds of MB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * side, 9)) + chunk(b"IEND", b"")
    )


BROKEN = {
    "zero_bytes": (lambda: b"", "empty file"),
    "random_bytes": (lambda: np.random.default_rng(0).bytes(5000), "not an image"),
    "html": (lambda: b"<html><body>404 Not Found</body></html>", "not an image"),
    "truncated_jpeg": (_truncated_jpeg, "cannot decode"),
    "bad_crc_png": (_bad_crc_png, "cannot decode"),
    "bomb": (_bomb_png, "max_image_pixels"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_give_a_clear_error(name):
    make, words = BROKEN[name]
    data = make()
    image, _w, _h, error = decoder().decode_one(data)
    assert image is None and words in error, error


def test_bomb_is_refused_before_decoding():
    data = _bomb_png()
    assert len(data) < 50_000
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ImageError, match="refused before decoding"):
        decode_image(data, LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000  # bytes; decoding would have needed 400 MB as RGB


def test_thin_strip_is_refused_by_the_model_pixel_limit():
    """3000x8 resizes to 195000x520: far past max_model_pixels, so it is an error row, not a crash."""
    data = encode(Image.fromarray(photo_like(3000, 8, 2)), "PNG")
    image, _w, _h, error = decoder().decode_one(data)
    assert image is None and "max_model_pixels" in error and "195000x520" in error


def test_oversized_file_is_refused():
    small = Limits(LIMITS.max_image_pixels, 100, LIMITS.max_model_pixels)
    with pytest.raises(ImageError, match="max_file_bytes=100"):
        decode_image(encode(RGB, "PNG"), small)


@pytest.mark.parametrize(
    "size",
    [
        (64, 48),
        (48, 64),
        (520, 700),
        (700, 520),
        (1024, 576),
        (333, 333),
        pytest.param((521, 1), marks=pytest.mark.slow),  # resized to 270920 x 520: seconds of CPU
    ],
)
def test_pil_resize_is_torchvisions_resize(size):
    """Decode workers resize with PIL alone; torchvision's F.resize does the same on PIL images."""
    import torchvision.transforms.functional as F

    image = Image.fromarray(photo_like(max(size[0], 2), max(size[1], 2), 3)).resize(size)
    spec = ResizeSpec.from_transforms(TRANSFORMS)
    expected = F.resize(
        image, list(TRANSFORMS.resize_size), interpolation=TRANSFORMS.interpolation, antialias=TRANSFORMS.antialias
    )
    got = spec.apply(image)
    assert got.shape[:2] == spec.output_size(*size) == (expected.height, expected.width)
    assert np.array_equal(got, np.asarray(expected))


def test_decode_workers_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, pickle; from segbatch.stages.decode import DecodeImages; d = pickle.loads(sys.stdin.buffer.read()); "
        "import numpy as np; from PIL import Image; d._resize.apply(Image.new('RGB', (64, 48))); "
        "print('torch' in sys.modules)"
    )
    import pickle

    data = pickle.dumps(DecodeImages("/", {}, ResizeSpec.from_transforms(TRANSFORMS), LIMITS))
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True)
    assert out.stdout.decode().strip() == "False"

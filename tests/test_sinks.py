"""Mask names, palette PNG encoding and atomic summary files."""

import io

import numpy as np
import pytest
from PIL import Image

from segbatch.contract import UnsafePathError, mask_relpath, voc_palette
from segbatch.writers import encode_png


def test_mask_names_keep_the_extension_so_stems_never_collide():
    assert mask_relpath("a.jpg") == "masks/a.jpg.png"
    assert mask_relpath("a.png") == "masks/a.png.png"
    assert mask_relpath("deep/er/x y.JPEG") == "masks/deep/er/x y.JPEG.png"


def test_mask_names_escape_url_specials_injectively():
    names = ["a#b.jpg", "a%23b.jpg", "a?b.jpg", "a%b.jpg", "ü/ñ.png"]
    out = [mask_relpath(n) for n in names]
    assert len(set(out)) == len(out)
    assert out[0] == "masks/a%23b.jpg.png" and out[1] == "masks/a%2523b.jpg.png"
    assert out[4] == "masks/ü/ñ.png.png"
    assert all("?" not in o and "#" not in o for o in out)


@pytest.mark.parametrize("rel", ["../x.jpg", "a/../../x.jpg", "/etc/x.jpg", "", "a//b.jpg", "./a.jpg", "a\\..\\b.jpg"])
def test_names_that_would_escape_output_are_refused(rel):
    with pytest.raises(UnsafePathError):
        mask_relpath(rel)


def test_png_is_single_channel_class_ids_with_voc_colours():
    mask = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_png(mask, 1)))
    assert image.mode == "P" and image.size == (3, 2)
    assert (np.asarray(image) == mask).all()
    rgb = np.asarray(image.convert("RGB"))
    palette = voc_palette()
    assert tuple(rgb[0, 1]) == (128, 0, 0) == tuple(palette[3:6])  # VOC aeroplane
    assert tuple(rgb[1, 0]) == (192, 128, 128)  # VOC person

"""segbatch.stages.writers: the mask PNG, and writers chosen by name from the registry."""

import io

import fsspec
import numpy as np
from PIL import Image

from segbatch.stages.listing import excluded_prefixes, output_owned_dirs
from segbatch.stages.writers import WRITERS, MaskWriter, OutputWriter, WriterContext, encode_png
from segbatch.store.contract import voc_palette


def test_png_is_single_channel_class_ids_with_voc_colours():
    mask = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_png(mask, 1)))
    assert image.mode == "P" and image.size == (3, 2)
    assert (np.asarray(image) == mask).all()
    rgb = np.asarray(image.convert("RGB"))
    palette = voc_palette()
    assert tuple(rgb[0, 1]) == (128, 0, 0) == tuple(palette[3:6])  # VOC aeroplane
    assert tuple(rgb[1, 0]) == (192, 128, 128)  # VOC person


def test_the_mask_writer_names_its_file_by_the_contract(tmp_path):
    writer = MaskWriter(WriterContext(str(tmp_path)))
    url = writer.write({"rel": "a/b#1.jpg"}, np.zeros((2, 3), np.uint8))
    assert url.endswith("/masks/a/b%231.jpg.png") and (tmp_path / "masks" / "a" / "b%231.jpg.png").is_file()


def test_a_registered_writer_is_all_it_takes(tmp_path, monkeypatch):
    """A new output is one class: run --writers takes its name, listing never reads its folder as input."""
    from segbatch.config import RunConfig

    class Inverted(OutputWriter):
        name, directory, suffix = "inverted", "inverted", ".png"

        def write(self, row, mask):
            return self._put(self.relpath(row["rel"]), encode_png(255 - mask, 1))

    monkeypatch.setitem(WRITERS._entries, Inverted.name, Inverted)
    config = RunConfig(input=str(tmp_path), output=str(tmp_path), writers=("inverted",))
    assert config.output_writers == ("mask", "inverted")
    assert "inverted" in output_owned_dirs()
    fs = fsspec.filesystem("file")
    assert str(tmp_path / "inverted") in excluded_prefixes(fs, str(tmp_path), str(tmp_path), {})
    url = Inverted(WriterContext(str(tmp_path))).write({"rel": "x.jpg"}, np.zeros((1, 1), np.uint8))
    assert url.endswith("/inverted/x.jpg.png")

"""Build the standard benchmark input: N photo-like 640x480 JPEGs (deterministic, license-free).

python benchmarks/bench_data.py bench-data/jpeg640 --count 128
python benchmarks/bench_data.py bench-data/photo12mp --count 8 --size 4000x3000   # phone-size photos
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageFilter

WIDTH, HEIGHT = 640, 480  # pixels; a common photo size, and the size docs/benchmarks.md reports
JPEG_QUALITY = 90  # typical camera/export quality; file sizes land near real photos (~60-120 KB)


def photo(seed: int, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Smooth regions, hard edges and texture: decodes and compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    img += np.linspace(rng.uniform(40, 200), rng.uniform(40, 200), height, dtype=np.float32)[:, None, None]
    for _ in range(12):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(20, 200, 2)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))


#: `--mixed`: six photo sizes, interleaved in listing order; the weights' 520-px resize maps them to four
#: model-input shapes (693x520 twice, 520x693 twice, 520x520, 924x520).
MIXED_SIZES = ((640, 480), (480, 640), (800, 600), (600, 800), (500, 500), (1024, 576))


def build(folder: str, count: int, sizes: tuple[tuple[int, int], ...] = ((WIDTH, HEIGHT),)) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"photo{i:05d}.jpg")
        if not os.path.exists(path):
            photo(i, *sizes[i % len(sizes)]).save(path, quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--mixed", action="store_true", help="six interleaved sizes instead of 640x480")
    parser.add_argument("--size", default=f"{WIDTH}x{HEIGHT}", help="WIDTHxHEIGHT (default %(default)s)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    sizes = MIXED_SIZES if args.mixed else ((width, height),)
    paths = build(args.folder, args.count, sizes)
    print(f"{len(paths)} JPEGs of {', '.join(f'{w}x{h}' for w, h in sizes)} in {args.folder}")


if __name__ == "__main__":
    main()

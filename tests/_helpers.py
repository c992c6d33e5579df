"""Shared test helpers: seeded checkpoints, test images, hand-made OUTPUTs, and the reference mask
(docs/output-contract.md)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.models import get_model_builder, get_model_weights

from segbatch.models.architectures import get_architecture
from segbatch.models.seeded import make_checkpoint  # noqa: F401  (the one copy: the demo's fallback uses it too)

TEST_ARCH = "deeplabv3_mobilenet_v3_large"  # the smallest architecture: fast enough for CI on 2 cores


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """An RGB image with smooth regions and edges, like a photo at a glance."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), dtype=np.float32)
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.1, 0.5) * max(width, height)
        colour = rng.uniform(0, 255, 3)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[inside] = colour
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def load_model(checkpoint: Path, arch: str = TEST_ARCH) -> torch.nn.Module:
    """The checkpoint in a plain torchvision model, the auxiliary head dropped: the reference's model."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    architecture = get_architecture(arch)
    num_classes = state[architecture.head_key].shape[0]
    aux = {"aux_loss": False} if architecture.has_aux else {}
    model = get_model_builder(arch)(weights=None, weights_backbone=None, num_classes=num_classes, **aux)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("aux_classifier.")})
    return model.eval()


@torch.inference_mode()
def reference_mask(data: bytes, model: torch.nn.Module, arch: str = TEST_ARCH) -> np.ndarray:
    """The output contract's reference mask, literally, for one image on its own."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).astype(np.uint8), mode="L")
    image = image.convert("RGB")
    width, height = image.size
    x = get_model_weights(arch).DEFAULT.transforms()(image)[None]
    out = model(x)["out"]
    up = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
    return up.argmax(1)[0].numpy().astype(np.uint8)


def wait_for_masks(proc, out: Path, count: int, timeout: float) -> None:
    """Wait until a running `segbatch run` has written ``count`` masks; it must still be running then."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "masks").glob("*.png"))) >= count:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the fault could be injected; give it more images"


def summary_table(out: Path) -> pa.Table:
    """Every row of a local OUTPUT's summary, with its schema metadata (class names)."""
    import pyarrow.dataset as pads

    return pads.dataset(out / "summary", format="parquet").to_table()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on loopback now (the tests bind everything they start to 127.0.0.1)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a == b).mean())


BROKEN = "broken.jpg"  # the one input of write_inputs that cannot be decoded: an error row


def write_inputs(root: Path) -> list[str]:
    """Six small images (JPEG, PNG, grey, EXIF-rotated, an odd name, a subfolder) and one broken file;
    returns their paths relative to ``root``, sorted."""
    (root / "sub").mkdir(parents=True)
    (root / "odd name").mkdir()
    Image.fromarray(photo_like(64, 48, 11)).save(root / "a.jpg", quality=92)
    Image.fromarray(photo_like(64, 48, 12)).save(root / "c.png")
    Image.fromarray(photo_like(56, 40, 13)).save(root / "sub" / "b.png")
    Image.fromarray(photo_like(48, 64, 14)).convert("L").save(root / "sub" / "gray.png")
    (root / "rot.jpg").write_bytes(exif_jpeg(photo_like(64, 48, 15), orientation=6))
    Image.fromarray(photo_like(40, 40, 16)).save(root / "odd name" / "x#1%.png")
    (root / BROKEN).write_bytes(b"\xff\xd8 not really a jpeg")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def write_output(out: Path, rows: list[dict], classes: list[str], input_root: str = "/in") -> None:
    """A hand-made OUTPUT in segbatch's layout, for tests that need exact masks or many rows cheaply.

    Each row is ``{"rel": ..., "mask": 2-D class ids}`` (an ok row) or ``{"rel": ..., "error": ...}``,
    optionally with ``"written_at"`` (ms since the epoch); each row list item becomes one summary file.
    """
    import pyarrow.parquet as pq

    from segbatch.stages.writers import encode_png
    from segbatch.store.contract import SUMMARY_DIR, SUMMARY_SCHEMA, mask_relpath, summary_metadata

    (out / SUMMARY_DIR).mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        ok = "mask" in row
        mask_uri = None
        if ok:
            rel_mask = mask_relpath(row["rel"])
            (out / rel_mask).parent.mkdir(parents=True, exist_ok=True)
            (out / rel_mask).write_bytes(encode_png(np.asarray(row["mask"], dtype=np.uint8), 1))
            mask_uri = str(out / rel_mask)
        h, w = np.shape(row["mask"]) if ok else (None, None)
        counts = np.bincount(np.ravel(row["mask"]), minlength=len(classes)).tolist() if ok else None
        record = {
            "uri": f"{input_root}/{row['rel']}",
            "status": "ok" if ok else "error",
            "error": None if ok else row["error"],
            "width": w,
            "height": h,
            "mask_uri": mask_uri,
            "pixel_counts": counts,
            "run_id": f"run{i}",
            "model": "hand-made",
            "written_at": row.get("written_at", 1_700_000_000_000 + i),
        }
        table = pa.Table.from_pylist([record], schema=SUMMARY_SCHEMA.with_metadata(summary_metadata(tuple(classes))))
        pq.write_table(table, out / SUMMARY_DIR / f"part-{i:04d}.parquet")

"""segbatch.store.contract: per-input output names (escaping, uniqueness, refusals).

The row schemas it declares are checked against the stages in tests/test_stage_schemas.py."""

import pytest

from segbatch.store.contract import UnsafePathError, input_relpath, mask_relpath


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


@pytest.mark.parametrize("rel", ["", "a\\..\\b.jpg", "a/", "a/.", "a/.."])
def test_names_that_name_no_file_are_refused(rel):
    with pytest.raises(UnsafePathError):
        mask_relpath(rel)


def test_dot_and_empty_segments_stay_inside_output_with_names_of_their_own():
    """Issue 22 item 1: S3 keys may hold ".", ".." and empty segments, each key a different object."""
    rels = ["../x.jpg", "a/../../x.jpg", "/etc/x.jpg", "a//b.jpg", "./a.jpg", "x.jpg", "a/b.jpg", "etc/x.jpg"]
    out = [mask_relpath(r) for r in rels]
    assert len(set(out)) == len(out)
    assert (
        out[0] == "masks/%2E%2E/x.jpg.png" and out[2] == "masks/%_/etc/x.jpg.png" and out[3] == "masks/a/%_/b.jpg.png"
    )
    for name, rel in zip(out, rels):
        assert name.startswith("masks/") and ".." not in name.split("/") and "" not in name.split("/")
        assert input_relpath(name) == rel
    assert mask_relpath("%2E/a.jpg") != mask_relpath("./a.jpg") and mask_relpath("%_/a.jpg") != mask_relpath("/a.jpg")

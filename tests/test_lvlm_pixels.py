"""Image preprocessing by lookup table (icdrl.lvlm.pixels) and the vision patch embedding as a
matrix product (icdrl.lvlm.hf_patches): the processor's and the tower's numbers, faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from icdrl.lvlm import load_backend
from icdrl.lvlm.hf import load_processor
from icdrl.lvlm.hf_patches import patch_embedding_as_matmul, patch_embeddings
from icdrl.lvlm.pixels import LookupPixels
from icdrl.lvlm.tiny import cached_checkpoint


@pytest.fixture(scope="module")
def qwen_ip():
    return load_processor(cached_checkpoint("qwen")).image_processor


def _noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)


def _kept(lp: LookupPixels, w: int, h: int) -> bool:
    f = lp.patch_size * lp.merge_size
    return tuple(
        lp.smart_resize(h, w, factor=f, min_pixels=lp.min_pixels, max_pixels=lp.max_pixels)
    ) == (h, w)


def test_probe_holds_every_value_of_every_channel():
    arr = np.asarray(LookupPixels.probe(64, 64))
    assert arr.shape == (64, 64, 3)
    for c in range(3):
        assert set(np.unique(arr[..., c]).tolist()) == set(range(256))
    assert not np.array_equal(arr[..., 0], arr[..., 1])  # each channel in another order


def test_lookup_equals_the_image_processor_exactly(qwen_ip):
    lp = LookupPixels.from_processor(qwen_ip)
    assert lp is not None and lp.table.shape == (3 * 256,) and lp.table.dtype == torch.float32
    sizes = [(64, 64), (32, 128), (96, 48), (128, 64)]
    kept = [s for s in sizes if _kept(lp, *s)]
    assert len(kept) >= 2  # the test means something: several sizes need no resizing
    # one size, and mixed sizes in one call (pixel_values concatenated in input order)
    for images in (
        [_noise(64, 64, i) for i in range(5)],
        [_noise(*kept[i % len(kept)], i) for i in range(7)] + [LookupPixels.probe(*kept[0])],
    ):
        got = lp(images)
        want = qwen_ip(images=images, return_tensors="pt")
        assert set(got) == {"pixel_values", "image_grid_thw"}
        assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
        assert got["pixel_values"].dtype == want["pixel_values"].dtype
        assert torch.equal(got["pixel_values"], want["pixel_values"])


def test_lookup_declines_what_it_cannot_mirror(qwen_ip):
    lp = LookupPixels.from_processor(qwen_ip)
    resized = next(s for s in [(30, 30), (50, 70), (1000, 1000), (17, 64)] if not _kept(lp, *s))
    assert lp([_noise(64, 64, 0), _noise(*resized, 1)]) is None  # needs resizing
    assert lp([_noise(64, 64, 0, mode="L")]) is None  # not RGB: the processor converts it
    assert lp([]) is None
    assert LookupPixels.from_processor(None) is None
    assert (
        LookupPixels.from_processor(load_processor(cached_checkpoint("llava")).image_processor)
        is None
    )


def test_backend_uses_the_table_and_matches_the_processor(tmp_path):
    b = load_backend({"kind": "hf"}, str(cached_checkpoint("qwen")))
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        _noise(64, 64, i).save(p)
        paths.append(str(p))
    calls = []
    table = b._lookup.__call__
    b._lookup = type(
        "Spy", (), {"__call__": lambda self, ims: calls.append(len(ims)) or table(ims)}
    )()
    entries = b._preprocess_images(paths)
    assert calls and b.fast_paths()["image_lookup_table"] and (64, 64) in b._lookup_sizes
    for p, e in zip(paths, entries):
        one = b._preprocess(p)
        assert torch.equal(e.tensors["pixel_values"], one.tensors["pixel_values"])
        assert torch.equal(e.tensors["image_grid_thw"], one.tensors["image_grid_thw"])


def test_a_table_that_differs_switches_off(tmp_path):
    """A table one value off (here: value 200 of the green channel) fails the per-size check on
    the probe image, and the backend preprocesses with the image processor from then on."""
    b = load_backend({"kind": "hf"}, str(cached_checkpoint("qwen")))
    table = b._lookup.table.clone()
    table[256 + 200] += 0.5
    b._lookup = LookupPixels(**{**b._lookup.__dict__, "table": table})
    p = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(p)  # the real image never shows value 200
    (e,) = b._preprocess_images([str(p)])
    assert b._lookup is None and not b.fast_paths()["image_lookup_table"]
    assert torch.equal(e.tensors["pixel_values"], b._preprocess(str(p)).tensors["pixel_values"])


def test_reference_path_has_no_table():
    ref = load_backend({"kind": "hf", "image_cache": "none"}, str(cached_checkpoint("qwen")))
    assert ref._lookup is None and not ref.fast_paths()["image_lookup_table"]


# ---------------------------------------------------------------------- patch embedding


def test_patch_embedding_as_matmul_matches_conv3d_and_restores():
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(cached_checkpoint("qwen"))).eval()
    (embed,) = patch_embeddings(model)
    conv = embed.proj
    n = 37
    x = torch.randn(n, conv.in_channels * int(np.prod(conv.kernel_size)))
    with torch.no_grad():
        want = embed(x)
        with patch_embedding_as_matmul([embed]):
            assert "forward" in embed.__dict__
            got = embed(x)
        assert "forward" not in embed.__dict__  # the class's forward again
        again = embed(x)
    assert got.shape == want.shape == (n, conv.out_channels)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))
    assert torch.equal(again, want)


def test_patch_embeddings_skip_convolutions_that_are_not_patchwise():
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(cached_checkpoint("qwen"))).eval()
    (embed,) = patch_embeddings(model)
    k = embed.proj.kernel_size
    embed.proj = torch.nn.Conv3d(embed.proj.in_channels, embed.proj.out_channels, k, stride=1)
    assert patch_embeddings(model) == []
    assert (
        patch_embeddings(load_backend({"kind": "hf"}, str(cached_checkpoint("llava"))).model) == []
    )

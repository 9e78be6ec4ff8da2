"""The prefix key/value cache on its own (no model): store, lookup, stack, eviction, scheduling."""

from __future__ import annotations

import pytest
import torch

from icdrl.lvlm.prefix_cache import PrefixCache, next_wave, prefix_key, right_aligned

HEADS, DIM, LAYERS = 2, 3, 2


def forward_cache(rows: int, width: int, seed: int = 0) -> list:
    """A forward's keys and values per layer, [rows, heads, width, dim], every entry distinct."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rows, HEADS, width, DIM, generator=g),
            torch.randn(rows, HEADS, width, DIM, generator=g),
        )
        for _ in range(LAYERS)
    ]


# a prompt: ids, images and boundaries (where the chat header / the first j demonstrations end)
HEADER = [1, 2]
A = ([*HEADER, 10, 11, 12, 20, 21], ("a.png", "q.png"), [(2, 0), (5, 1)])
AB = ([*HEADER, 10, 11, 12, 13, 14, 20, 21], ("a.png", "b.png", "q.png"), [(2, 0), (5, 1), (7, 2)])
C = ([*HEADER, 30, 31, 20, 21], ("c.png", "q.png"), [(2, 0), (4, 1)])


def test_store_then_lookup_and_stack_give_the_forward_columns():
    """Rows at different columns of a forward (left padding): the stored prefixes read back
    exactly their columns, left-padded to one width, with the mask marking them."""
    width = 9
    kv = forward_cache(2, width)
    col = [width - len(AB[0]), width - len(C[0])]  # left padded: column of id 0
    cache = PrefixCache(16)
    assert cache.store([(*AB, col[0], 0), (*C, col[1], 0)], kv) == 4  # header (once), a, ab, c
    assert len(cache) == 4
    pk_ab = cache.lookup(*AB)
    pk_a = cache.lookup(A[0], A[1], A[2])
    pk_c = cache.lookup(*C)
    assert (pk_ab.length, pk_ab.n_images, pk_a.length, pk_a.n_images, pk_c.length) == (
        7,
        2,
        5,
        1,
        4,
    )
    data, mask = cache.stack([pk_a, None, pk_ab, pk_c])
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [0] * 7, [1] * 7, [0, 0, 0, 1, 1, 1, 1]]
    for (k, v), (fk, fv) in zip(data, kv):
        assert k.shape == (4, HEADS, 7, DIM)
        assert torch.equal(k[0, :, 2:], fk[0, :, col[0] : col[0] + 5]) and torch.equal(
            v[0, :, 2:], fv[0, :, col[0] : col[0] + 5]
        )
        assert torch.equal(k[2], fk[0, :, col[0] : col[0] + 7])
        assert torch.equal(v[3, :, 3:], fv[1, :, col[1] : col[1] + 4])
        assert not k[1].any()  # the row without a prefix: zeros, masked out


def test_one_row_per_prompt_and_the_header_apart():
    """The prefixes of one prompt share one row of the copy (its longest); the chat header has
    a copy of its own, so it keeps no forward's rows alive."""
    kv = forward_cache(1, len(AB[0]))
    cache = PrefixCache(16)
    cache.store([(*AB, 0, 0)], kv)
    header = cache.entries[prefix_key(AB[0], AB[1], 2, 0)]
    a, ab = cache.entries[prefix_key(*AB[:2], 5, 1)], cache.entries[prefix_key(*AB[:2], 7, 2)]
    assert (
        a.layers is ab.layers
        and a.row == ab.row == 0
        and a.layers[0][0].shape == (1, HEADS, 7, DIM)
    )
    assert header.layers is not a.layers and header.layers[0][0].shape == (1, HEADS, 2, DIM)
    # the usual stacking (one copy, every row ending in its last column) and the general one agree
    fast, _ = cache.stack([ab, ab])
    general, _ = cache.stack([ab, a])
    assert torch.equal(fast[0][0][1], general[0][0][0])


@pytest.mark.parametrize("usual", [True, False])
def test_stack_into_given_buffers_writes_what_it_returns_otherwise(usual):
    """``into``: the stacked prefixes land in the caller's (strided) views, the same numbers as
    new tensors, rows without a prefix zeroed over whatever the buffers held; both ways of
    stacking (one stored copy with every row ending in its last column, and the general one)."""
    width = 9
    kv = forward_cache(2, width)
    col = [width - len(AB[0]), width - len(C[0])]
    cache = PrefixCache(16)
    cache.store([(*AB, col[0], 0), (*C, col[1], 0)], kv)
    ab, a, c = cache.lookup(*AB), cache.lookup(*A), cache.lookup(*C)
    rows = [ab, ab] if usual else [a, None, ab, c]
    want, want_mask = cache.stack(rows)
    bufs = []

    def into(w, like):
        assert w == 7 and len(like) == LAYERS
        bufs[:] = [
            tuple(
                torch.full((len(rows), t.shape[1], w + 4, t.shape[3]), float("nan")) for t in layer
            )
            for layer in like
        ]
        return [tuple(b[:, :, 1 : 1 + w] for b in pair) for pair in bufs]  # strided views

    got, mask = cache.stack(rows, into=into)
    assert torch.equal(mask, want_mask)
    for (gk, gv), (wk, wv), (bk, _) in zip(got, want, bufs):
        assert torch.equal(gk, wk) and torch.equal(gv, wv)
        assert gk.data_ptr() == bk[:, :, 1:].data_ptr()  # written in place
        assert bk[:, :, 0].isnan().all()  # nothing outside the views


def test_only_prefixes_longer_than_what_was_read_are_new():
    kv = forward_cache(1, 9)
    cache = PrefixCache(16)
    assert cache.store([(*AB, 0, 5)], kv) == 1  # ran on its 1-demonstration prefix: only ab is new
    assert list(cache.entries) == [prefix_key(*AB[:2], 7, 2)]
    assert cache.store([(*AB, 0, 5)], kv) == 0  # already there


def test_max_demos_and_size_zero():
    kv = forward_cache(1, 7)
    cache = PrefixCache(16, max_demos=1)
    cache.store([(*AB, 0, 0)], kv)
    assert sorted(pk.n_images for pk in cache.values()) == [0, 1]
    assert cache.shareable(*AB) == [
        prefix_key(*AB[:2], 5, 1)
    ]  # no header, nothing beyond max_demos
    off = PrefixCache(0)
    assert off.store([(*AB, 0, 0)], kv) == 0 and not off and off.shareable(*AB) == []
    with pytest.raises(ValueError, match="prefix cache size must be >= 0"):
        PrefixCache(-1)


def test_eviction_is_lru_but_keeps_headers_and_protected_keys():
    cache = PrefixCache(1)  # one demonstration prefix; the header is not counted
    kv = forward_cache(1, 7)
    cache.store([(*A, 0, 0)], kv)  # header, a
    assert [pk.n_images for pk in cache.values()] == [0, 1]
    cache.store([(*C, 0, 0)], kv)  # c: a is the oldest non-header
    assert [pk.n_images for pk in cache.values()] == [0, 1] and cache.lookup(*C).length == 4
    key_a, key_ab, key_c = (
        prefix_key(*p[:2], n, j) for p, n, j in ((A, 5, 1), (AB, 7, 2), (C, 4, 1))
    )
    cache.protected = frozenset({key_a, key_c})
    cache.store(
        [(*AB, 0, 0)], kv
    )  # a, ab new; a and c protected: only ab goes, 2 > 1 demonstration prefixes
    assert list(cache.entries) == [prefix_key(HEADER, (), 2, 0), key_c, key_a]
    cache.protected = frozenset()
    cache.evict()
    assert list(cache.entries) == [prefix_key(HEADER, (), 2, 0), key_a]
    assert cache.lookup(*C).n_images == 0  # c evicted: the header remains


def test_right_aligned_pads_with_the_first_column():
    kv = forward_cache(2, 6)
    got = right_aligned(kv, [1, 0], [2, 0], [3, 5], 5, "cpu")
    k, full = got[0][0], kv[0][0]
    assert torch.equal(k[0, :, 2:], full[1, :, 2:5]) and torch.equal(k[0, :, 0], full[1, :, 2])
    assert torch.equal(k[1], full[0, :, 0:5])


def test_next_wave_runs_the_longest_nested_prompt_first():
    """A query's 1..4-shot prompts (each extending the previous): longest first, one wave stores
    every prefix and the second runs the three shorter ones on them; shortest first needs four."""
    d = [("d1",), ("d1", "d2"), ("d1", "d2", "d3"), ("d1", "d2", "d3", "d4")]
    rows = [d[:k] for k in range(1, 5)]  # row k-1: the k-shot prompt's prefix keys, shortest first
    cached: set = set()
    ready, wait = next_wave(rows[::-1], cached.__contains__)
    assert ready == [0] and wait == [1, 2, 3]
    cached.update(d)
    assert next_wave([rows[::-1][i] for i in wait], cached.__contains__) == ([0, 1, 2], [])
    waves, pending, cached = 0, rows, set()
    while pending:
        ready, wait = next_wave(pending, cached.__contains__)
        cached.update(k for i in ready for k in pending[i])
        pending, waves = [pending[i] for i in wait], waves + 1
    assert waves == 4


def test_next_wave_disjoint_and_cached_rows_all_run():
    assert next_wave([["a"], ["b"], []], lambda k: False) == ([0, 1, 2], [])
    # two rows share x, not cached: the first stores it, the second waits; once cached both run
    assert next_wave([["x", "y"], ["x", "z"]], lambda k: False) == ([0], [1])
    assert next_wave([["x", "y"], ["x", "z"]], lambda k: k == "x") == ([0, 1], [])
    # a row whose longer key is cached does not wait for a shorter shared one
    assert next_wave([["x"], ["x", "w"]], lambda k: k == "w") == ([0, 1], [])

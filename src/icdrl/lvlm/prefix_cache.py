"""Keys and values of prompt prefixes, kept for later prompts that start with them.

A prompt's *boundaries* are where its chat header (the ids before the first image) ends, and
where the chat header with its first j demonstrations ends: ``(length in ids, j)``, one per
image. A later prompt whose ids (and images) start with a stored prefix runs only the ids
after it, attending to the stored keys and values (:meth:`PrefixCache.stack`). Prefixes are
keyed by their token ids *and* image paths: two demonstrations with the same text and different
images are different prefixes.

Storage. The prefixes one forward pass stores are copied out of its cache together, one row per
storing prompt (the prompt's longest new prefix), right-aligned in a common width: shorter
prefixes of the same prompt are the same row read to a shorter length. The chat header, which
every later prompt reads, gets a copy of its own, so that it keeps no forward's rows alive.
Stacking rows that all end in their copy's last column is a row selection and a slice.

Scheduling (:func:`next_wave`): within one request, a prompt whose prefix another prompt of the
request will store waits until that one ran.

Nothing here needs a model: the tensors are plain ``(keys, values)`` pairs per layer,
``[rows, kv_heads, columns, head_dim]``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

#: (length in ids, images before it): where the chat header (j = 0) or the first j demonstrations end
Boundary = tuple[int, int]


@dataclass
class PrefixKV:
    """Keys and values of a prompt's first ``length`` ids (its first ``n_images`` images).

    They sit in row ``row`` of ``layers``, columns ``column`` to ``column + length``: ``layers``
    is one copy per layer ``(keys [rows, kv_heads, columns, head_dim], values)``, shared by the
    prefixes that one forward pass stored.
    """

    length: int
    n_images: int
    layers: list
    row: int
    column: int


def prefix_key(ids: Sequence[int], images: Sequence[str], length: int, n_images: int) -> tuple:
    """The cache key of the first ``length`` ids (holding the first ``n_images`` images)."""
    return (tuple(ids[:length]), tuple(images[:n_images]))


def right_aligned(
    layers, rows: Sequence[int], starts: Sequence[int], lengths: Sequence[int], width: int, device
) -> list:
    """Per layer, ``(keys, values)[rows, :, start : start + length]`` of each row, right-aligned in
    ``width`` columns: [len(rows), kv_heads, width, head_dim], one indexing per layer.

    A column left of a row's span repeats the span's first column (finite; always masked out).
    """
    first = (
        torch.tensor([s + n - width for s, n in zip(starts, lengths)])[:, None]
        + torch.arange(width)[None, :]
    )
    cols = torch.maximum(first, torch.tensor(list(starts))[:, None]).to(device)
    src = torch.tensor(list(rows), device=device)[:, None]
    # t[src, :, cols]: [rows, width, heads, dim] -> [rows, heads, width, dim]
    return [(k[src, :, cols].transpose(1, 2), v[src, :, cols].transpose(1, 2)) for k, v in layers]


def next_wave(
    keys: Sequence[Sequence[Hashable]], cached: Callable[[Hashable], bool]
) -> tuple[list[int], list[int]]:
    """Split rows into those that run now and those that wait for a prefix a row running now stores.

    ``keys[i]``: row ``i``'s prefix keys that other rows may share, shortest first. A key held by
    two or more rows and not ``cached`` is *open* for a row unless a longer key of that row is
    cached (the row reads that one). Rows are visited in the given order: a row runs now unless
    an open key of its own was taken by an earlier row that runs now; then it takes its open keys.
    Visiting the longest rows first lets one row store the prefixes of all its nested shorter
    ones (a 4-shot prompt those of its 1-, 2- and 3-shot ones). The first row always runs.
    """
    count = Counter(k for ks in keys for k in ks)
    taken: set = set()
    ready: list[int] = []
    wait: list[int] = []
    for i, ks in enumerate(keys):
        start = next((j + 1 for j in range(len(ks) - 1, -1, -1) if cached(ks[j])), 0)
        open_keys = [k for k in ks[start:] if count[k] > 1]
        if any(k in taken for k in open_keys):
            wait.append(i)
        else:
            ready.append(i)
            taken.update(open_keys)
    return ready, wait


class PrefixCache:
    """An LRU of :class:`PrefixKV` (``size`` demonstration prefixes; 0: off), keeping prefixes of
    at most ``max_demos`` demonstrations (None: all).

    Chat headers are kept apart from ``size`` and never evicted (every later prompt reads them;
    there is one per system prompt). Eviction (oldest first) skips the keys in :attr:`protected`
    (those the rest of a request still reads), so the cache may exceed ``size`` while they are
    protected; :meth:`evict` trims it again.
    """

    def __init__(self, size: int, max_demos: int | None = None):
        if size < 0:
            raise ValueError(f"prefix cache size must be >= 0 (0: off), got {size}")
        self.size = int(size)
        #: keep only prefixes of at most this many demonstrations (None: all). A caller that
        #: knows its longest prompt (beam search of depth D: D demonstrations) sets D - 1, so
        #: that the last step's prefixes, which nothing reads, neither cost a copy nor evict
        #: the ones the extra candidate sequences still read.
        self.max_demos = max_demos
        self.entries: OrderedDict[tuple, PrefixKV] = OrderedDict()
        #: keys eviction skips (set by a caller for the duration of a request)
        self.protected: frozenset = frozenset()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries

    def values(self):
        return self.entries.values()

    def clear(self) -> None:
        self.entries.clear()

    def keeps(self, n_images: int) -> bool:
        """Whether prefixes of ``n_images`` demonstrations are stored at all."""
        return bool(self.size) and (self.max_demos is None or n_images <= self.max_demos)

    def shareable(
        self, ids: Sequence[int], images: Sequence[str], boundaries: Sequence[Boundary]
    ) -> list[tuple]:
        """Keys of the stored kinds of prefixes with at least one demonstration, shortest first
        (what :func:`next_wave` schedules on; every prompt shares the chat header)."""
        return [prefix_key(ids, images, n, j) for n, j in boundaries if j >= 1 and self.keeps(j)]

    def lookup(
        self, ids: Sequence[int], images: Sequence[str], boundaries: Sequence[Boundary]
    ) -> PrefixKV | None:
        """The longest stored prefix among ``boundaries`` (marked recently used), or None."""
        for length, j in reversed(boundaries):
            key = prefix_key(ids, images, length, j)
            pk = self.entries.get(key)
            if pk is not None:
                self.entries.move_to_end(key)
                return pk
        return None

    def store(self, rows: Sequence[tuple], layers) -> int:
        """Keep the new prefixes of one forward pass; returns how many were stored.

        ``rows``: per row of the forward ``(ids, images, boundaries, column, done)``: its token
        ids, image paths and boundaries, the forward column of its id 0 (``column + i`` holds
        id ``i``; negative where its first ids came from a cached prefix) and how many of its
        ids came from a cached prefix (only longer prefixes are new). ``layers``: the forward's
        keys and values per layer.
        """
        if not self.size:
            return 0
        new = []  # (key, row, length, n_images)
        seen: set = set()
        for r, (ids, images, boundaries, _col, done) in enumerate(rows):
            for length, j in boundaries:
                if not self.keeps(j):
                    break
                key = prefix_key(ids, images, length, j)
                if length > done and key not in self.entries and key not in seen:
                    seen.add(key)
                    new.append((key, r, length, j))
        if not new:
            return 0
        device = layers[0][0].device
        for group in (
            [e for e in new if e[3] == 0],
            [e for e in new if e[3] > 0],
        ):  # the chat header apart
            longest: dict[int, int] = {}
            for _, r, length, _ in group:
                longest[r] = max(longest.get(r, 0), length)
            if not longest:
                continue
            order = list(longest)
            width = max(longest.values())
            copy = right_aligned(
                layers,
                order,
                [rows[r][3] for r in order],
                [longest[r] for r in order],
                width,
                device,
            )
            at = {r: i for i, r in enumerate(order)}
            for key, r, length, j in group:
                self.entries[key] = PrefixKV(length, j, copy, at[r], width - longest[r])
        self.evict()
        return len(new)

    def evict(self) -> None:
        """Drop the oldest demonstration prefixes beyond ``size`` (chat headers are not counted and
        never dropped), except :attr:`protected` keys."""
        demos = [k for k in self.entries if k[1]]
        excess = len(demos) - self.size
        if excess <= 0:
            return
        for key in [k for k in demos if k not in self.protected][:excess]:
            del self.entries[key]

    @staticmethod
    def stack(prefixes: Sequence[PrefixKV | None], into=None) -> tuple[list, torch.Tensor]:
        """The rows' prefixes left-padded to one length: per layer ``(keys, values)``
        [rows, kv_heads, width, head_dim], and their attention mask [rows, width] (zeros where a
        row has no prefix; its keys and values there are zeros). At least one entry must be a
        prefix.

        ``into(width, layers)``: where to write them, per layer ``(keys, values)`` of that shape
        (views of a cache's buffers, filled in place: one copy from the stored prefixes);
        ``layers`` are stored ones, for their heads, dtype and device. Default: new tensors.
        """
        n = len(prefixes)
        lengths = torch.tensor([pk.length if pk else 0 for pk in prefixes])
        width = int(lengths.max())
        mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        copies = {id(pk.layers): pk.layers for pk in prefixes if pk}
        ref = next(iter(copies.values()))
        dev = ref[0][0].device
        stored = ref[0][0].shape[2]
        if into is None:
            data = [
                tuple(t.new_empty((n, t.shape[1], width, t.shape[3])) for t in layer)
                for layer in ref
            ]
        else:
            data = into(width, ref)
        if len(copies) == 1 and all(pk and pk.column + pk.length == stored for pk in prefixes):
            # the usual case: one stored copy, every row ending in its last column
            src = torch.tensor([pk.row for pk in prefixes], device=dev)
            for layer, out in zip(ref, data):
                for t, o in zip(layer, out):
                    torch.index_select(t[:, :, stored - width :], 0, src, out=o)
            return data, mask
        empty = [r for r, pk in enumerate(prefixes) if not pk]
        if empty:
            rows = torch.tensor(empty, device=dev)
            for out in data:
                for o in out:
                    o.index_fill_(0, rows, 0)
        for layers in copies.values():
            at = [r for r, pk in enumerate(prefixes) if pk and pk.layers is layers]
            pks = [prefixes[r] for r in at]
            got = right_aligned(
                layers,
                [pk.row for pk in pks],
                [pk.column for pk in pks],
                [pk.length for pk in pks],
                width,
                dev,
            )
            rows = torch.tensor(at, device=dev)
            for out, parts in zip(data, got):
                for o, part in zip(out, parts):
                    o.index_copy_(0, rows, part)
        return data, mask

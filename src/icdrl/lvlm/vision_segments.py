"""The Qwen2.5-VL vision tower's per-segment attention in a few batched calls (same numbers).

The vision tower packs all images of a batch into one sequence and attends within segments
(whole images, or windows of an image) given by ``cu_seqlens``. For the sdpa and eager
implementations, transformers loops over the segments and makes one attention call per
segment: 64 images x 4 blocks = 256 small calls per forward pass (and as many in the backward
pass) for the embedded LVLM's vision pretraining. :func:`batched_segments` makes it run the
segments of each length as one batch through the same implementation instead. Each
(segment, head) is computed on its own either way, so the features and their gradients are
bitwise the ones of the loop (``tests/test_embedded.py`` checks both).

How: an attention function whose registered name contains "flash" makes Qwen2.5-VL's vision
attention take its packed-sequence branch, which hands over the segment boundaries
(``cu_seq_lens_q``) instead of looping itself; the function then calls the implementation the
config named. ``icdrl.lvlm.hf`` does the same for the serving backend.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

#: registered attention name ("flash" selects the packed-sequence branch; see the module doc)
NAME = "icdrl_flash_batched_segments"
_state = threading.local()  # .inner: the wrapped implementation's name while a block runs


def segments_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """Attention within each segment of ``query``/``key``/``value`` [1, heads, total, dim].

    ``cu_seq_lens_q``: the segment boundaries (back to back). Segments of equal length run as
    one batch [n, heads, length, dim] through ``_state.inner``. Returns [1, total, heads, dim],
    as transformers' per-segment loop does.
    """
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    inner = ALL_ATTENTION_FUNCTIONS[_state.inner]
    if cu_seq_lens_q is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    by_length: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            by_length.setdefault(b - a, []).append(a)
    total = query.shape[2]
    if len(by_length) == 1:  # the usual case: one image size, one batched call on views
        ((length, starts),) = by_length.items()
        n = len(starts)
        q, k, v = (
            t[0, :, starts[0] : starts[0] + n * length].unflatten(1, (n, length)).transpose(0, 1)
            for t in (query, key, value)
        )
        out, _ = inner(module, q, k, v, None, **kwargs)  # [n, length, heads, dim]
        return out.reshape(1, total, *out.shape[2:]), None
    out = query.new_empty((total, query.shape[1], value.shape[-1]))
    for length, starts in by_length.items():
        rows = (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).to(query.device)
        q, k, v = (t[0][:, rows].transpose(0, 1) for t in (query, key, value))
        o, _ = inner(module, q, k, v, None, **kwargs)
        out[rows.reshape(-1)] = o.reshape(-1, *o.shape[2:])
    return out[None], None


AttentionInterface.register(NAME, segments_attention)


def _vision_config(model):
    """The vision tower's config (shared by its modules), or None where there is none."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    return getattr(visual, "config", None)


@contextmanager
def batched_segments(model):
    """Within the block, ``model``'s vision tower attends segment-batched (same numbers).

    A no-op unless the tower's attention is sdpa or eager (flash implementations already take
    the segment boundaries). Not reentrant across threads sharing ``model``.
    """
    cfg = _vision_config(model)
    inner = getattr(cfg, "_attn_implementation", None)
    if inner not in ("sdpa", "eager"):
        yield
        return
    saved = getattr(_state, "inner", None)
    _state.inner = inner
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = inner
        _state.inner = saved

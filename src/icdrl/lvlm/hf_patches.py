"""The transformers internals the backend's fast paths rely on (the code a transformers upgrade is likeliest to break).

Two attention implementations registered with transformers' ``AttentionInterface`` and the
context managers that switch modules to them for one forward pass:

* :func:`scored_columns_attention` with :func:`last_layer_at`: the last decoder layer's attention
  queries, attention output projection and MLP run only at given columns per row (the ones whose
  logits are read); keys and values still come from every column. Exact for those columns:
  nothing after that layer reads the others.
* :func:`segments_attention` with :func:`vision_in_segments`: the Qwen2.5-VL vision tower's
  attention runs once per layer and segment length, all images (or windows) of that length in
  one batch, instead of once per image or window as transformers loops. Same numbers.
* :func:`shared_kv_attention` with :func:`shared_kv_heads`: the decoder's sdpa attention reads
  each key/value head in place for its group of query heads (``enable_gqa``), where
  transformers copies the keys and values per query head (``repeat_kv``) or, for a single
  query, folds the query heads into rows. Same numbers for several queries; for one query
  (a decoding step) they agree to float rounding.
* :func:`mlps_in_place` (:func:`gated_mlps`) and :func:`rope_in_halves` (:func:`rope_functions`):
  the gated SiLU MLPs write their activation and product into one intermediate, and the rope
  rotates in halves instead of building a rotated copy. The same kernels on the same numbers,
  so the same bits; each is checked against transformers' own function on a random input
  before it is used.
* :func:`vision_geometry`: the tower's grid-only inputs (rope positions, window order, segment
  boundaries), computed by transformers' own helpers once per list of grids.
* :func:`roomy_cache`: a key/value cache whose layers (:class:`RoomyLayer`) keep spare columns,
  so that a decoding step writes its column in place instead of copying the cache; a
  :class:`KVBlock` holds the roomy caches of several batches in one buffer per layer, so that
  they are decoded as one without copying them together.

Each switch is made on a *copy* of the modules' config (:func:`attention_as`), restored after
the block, so nothing outside the block sees it. The backend checks every one of these against
the unpatched model (tests, and its once-per-backend checks).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

#: name under which :func:`scored_columns_attention` is registered with transformers
SCORED_COLUMNS = "icdrl_scored_columns"
SCORED_STATE = (
    threading.local()
)  # .pos [rows, m] and .inner (the wrapped implementation) during one forward


def scored_columns_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of the queries at columns ``SCORED_STATE.pos`` only, by the implementation ``SCORED_STATE.inner``.

    ``query`` [rows, heads, columns, dim]; keys and values as given (every column, and any cached
    prefix). The mask keeps its rows at ``pos`` (a causal one is built where transformers passes
    none). Returns [rows, columns, heads, dim] like the wrapped function, zeros at the other
    columns: only the attention output projection reads them, and it runs at ``pos`` only.
    """
    pos = SCORED_STATE.pos
    b, h, n, d = query.shape
    m = pos.shape[1]
    q = query.gather(2, pos[:, None, :, None].expand(b, h, m, d))
    if attention_mask is None:  # causal: column i sees key j iff j <= (cached columns) + i
        past = key.shape[2] - n
        mask = (
            torch.arange(key.shape[2], device=q.device)[None, None, None, :]
            <= (past + pos)[:, None, :, None]
        )
    else:
        full_mask = attention_mask.expand(b, -1, -1, -1)
        mask = full_mask.gather(
            2, pos[:, None, :, None].expand(b, full_mask.shape[1], m, full_mask.shape[3])
        )
    kwargs["is_causal"] = False
    out, _ = ALL_ATTENTION_FUNCTIONS[SCORED_STATE.inner](module, q, key, value, mask, **kwargs)
    full = out.new_zeros((b, n, *out.shape[2:]))
    full.scatter_(1, pos[:, :, None, None].expand(b, m, *out.shape[2:]), out)
    return full, None


AttentionInterface.register(SCORED_COLUMNS, scored_columns_attention)


#: name under which :func:`segments_attention` is registered. It contains "flash" because that
#: is what makes Qwen2.5-VL's vision attention take its packed-sequence branch, the one that
#: passes the segment boundaries (``cu_seq_lens_q``) instead of looping over the segments itself.
SEGMENTS = "icdrl_flash_segments"
SEGMENT_STATE = (
    threading.local()
)  # .inner (the wrapped implementation) while the vision encoder runs


def segments_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """Attention within each segment of a packed sequence, by the implementation ``SEGMENT_STATE.inner``.

    ``query``/``key``/``value`` [1, heads, total, dim] hold the segments (images, or windows of
    an image) one after another, ``cu_seq_lens_q`` their boundaries. The segments of each
    length run as one batch in one ``inner`` call, where transformers' loop for non-flash
    implementations makes one call per segment; same numbers. Returns [1, total, heads, dim]
    like that loop.
    """
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    inner = ALL_ATTENTION_FUNCTIONS[SEGMENT_STATE.inner]
    if cu_seq_lens_q is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    _, h, total, d = query.shape
    bounds = cu_seq_lens_q.tolist()
    groups: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            groups.setdefault(b - a, []).append(a)
    out = query.new_empty((total, h, value.shape[-1]))
    for length, starts in groups.items():
        n, first = len(starts), starts[0]
        if starts == list(
            range(first, first + n * length, length)
        ):  # back to back: views, no copies
            span = slice(first, first + n * length)
            q, k, v = (
                t[0, :, span].unflatten(1, (n, length)).transpose(0, 1) for t in (query, key, value)
            )
        else:
            span = (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).to(query.device)
            q, k, v = (t[0][:, span].transpose(0, 1) for t in (query, key, value))
            span = span.reshape(-1)
        o, _ = inner(
            module, q, k, v, None, **kwargs
        )  # [n, heads, length, dim] in, [n, length, heads, dim] out
        out[span] = o.reshape(-1, *o.shape[2:])
    return out[None], None


AttentionInterface.register(SEGMENTS, segments_attention)


#: name under which :func:`shared_kv_attention` is registered
SHARED_KV = "icdrl_sdpa_shared_kv"


def shared_kv_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """sdpa with the key/value heads shared by their query heads in place (``enable_gqa``).

    ``query`` [rows, heads, columns, dim], ``key``/``value`` [rows, kv heads, columns, dim],
    ``attention_mask`` [rows, 1, columns, key columns] (boolean or additive). Returns
    [rows, columns, heads, dim] like transformers' sdpa function, which is called instead
    where there is no mask (its causal and cropping logic applies), no head sharing, or a
    term this function does not add (a position bias, attention sinks, logit soft-capping).
    On the CPU, where sdpa's flash kernel takes a mask and shared heads: several queries give
    the numbers of ``repeat_kv`` bit for bit without copying keys and values; a single query
    (a decoding step) runs about twice as fast as transformers' folding of the query heads
    into rows, and agrees with it to float rounding (the kernel's blocks differ).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    extra = any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "softcap"))
    if attention_mask is None or groups == 1 or extra:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_KV, shared_kv_attention)


def shared_kv_modules(model) -> list[torch.nn.Module]:
    """The decoder's attention modules that share key/value heads among query heads and run
    on sdpa, where the model runs on the CPU (elsewhere sdpa's fast kernels take no mask with
    shared heads); else none."""
    try:
        layers = model.get_decoder().layers
        device = next(model.parameters()).device
    except (AttributeError, TypeError, StopIteration):
        return []
    mods = [getattr(layer, "self_attn", None) for layer in layers]
    if (
        device.type != "cpu"
        or not mods
        or any(
            getattr(getattr(m, "config", None), "_attn_implementation", None) != "sdpa"
            or getattr(m, "num_key_value_groups", 1) <= 1
            for m in mods
        )
    ):
        return []
    return mods


def shared_kv_heads(modules: Sequence[torch.nn.Module]):
    """Within the block, ``modules`` (:func:`shared_kv_modules`) attend by
    :func:`shared_kv_attention` (a no-op for none)."""
    return attention_as(modules, SHARED_KV)


@contextmanager
def attention_as(modules: Sequence[torch.nn.Module], name: str):
    """Within the block, ``modules`` read a copy of their config (one per shared config) whose
    attention implementation is ``name``; yields the implementation they named (None: no modules)."""
    saved = [m.config for m in modules]
    copies: dict[int, object] = {}
    for m, cfg in zip(modules, saved):
        if id(cfg) not in copies:
            copies[id(cfg)] = copy.copy(cfg)
            copies[id(cfg)]._attn_implementation = name
        m.config = copies[id(cfg)]
    try:
        yield saved[0]._attn_implementation if saved else None
    finally:
        for m, cfg in zip(modules, saved):
            m.config = cfg


@dataclass
class LastLayer:
    """The parts of the last decoder layer that run at the read columns only (scoring, a generation's first step)."""

    rowwise: list  # its attention output projection and MLP (act on each position alone)
    attn: torch.nn.Module | None  # its attention module, where the implementation is sdpa or eager


def last_layer_parts(model) -> LastLayer | None:
    """The last decoder layer's parts whose output feeds only the read positions' logits.

    Its attention output projection and its MLP (position-wise; after them come only the
    residual add, the final norm and the LM head, all per position, and no later layer), and
    its attention's queries (keys and values still come from every position), where that
    attention runs on ``sdpa`` or ``eager``. None where the model is not laid out that way.
    """
    try:
        decoder = model.get_decoder()
        layer = decoder.layers[-1]
        rowwise = [layer.self_attn.o_proj, layer.mlp]
    except (AttributeError, IndexError, TypeError):
        return None
    if not all(isinstance(m, torch.nn.Module) for m in rowwise):
        return None
    attn = layer.self_attn
    cfg = getattr(attn, "config", None)
    ok = (
        cfg is not None
        and not getattr(cfg, "sub_configs", None)
        and cfg._attn_implementation in ("sdpa", "eager")
    )
    return LastLayer(rowwise, attn if ok else None)


@contextmanager
def last_layer_at(last: LastLayer | None, pos: torch.Tensor):
    """Within the block, the parts ``last`` (:func:`last_layer_parts`) run only at columns ``pos``.

    ``pos`` [rows, m]: per row the input columns whose logits are read. The row-wise modules'
    inputs are gathered to [rows, m, ...] and their outputs scattered back as a zero tensor of
    the full shape; the attention computes only the queries at ``pos`` (see
    :func:`scored_columns_attention`). Every other column's final hidden state is thus wrong,
    but nothing reads it: the logits are taken at ``pos`` only, and keys and values, the
    key/value cache included, come from each layer's input. Exact for the columns ``pos``.
    ``last`` None: the block runs unchanged.
    """
    if last is None:
        yield
        return
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
    width = []

    def gather(module, args):
        (h, *rest) = args
        width.append(h.shape[1])
        return (h[rows, pos], *rest)

    def scatter(module, args, out):
        full = out.new_zeros((out.shape[0], width.pop(), *out.shape[2:]))
        full[rows, pos] = out
        return full

    handles = [
        h
        for m in last.rowwise
        for h in (m.register_forward_pre_hook(gather), m.register_forward_hook(scatter))
    ]
    try:
        with attention_as([last.attn] if last.attn is not None else [], SCORED_COLUMNS) as inner:
            SCORED_STATE.pos, SCORED_STATE.inner = pos, inner
            yield
    finally:
        for h in handles:
            h.remove()
        SCORED_STATE.pos = None


def vision_modules(model) -> list[torch.nn.Module]:
    """The Qwen2.5-VL vision tower's modules that read its config, where its attention is sdpa
    or eager (flash implementations already take the segment boundaries); else none."""
    mods = [
        m
        for m in model.modules()
        if getattr(getattr(m, "config", None), "model_type", None) == "qwen2_5_vl_vision"
    ]
    if not mods or any(m.config._attn_implementation not in ("sdpa", "eager") for m in mods):
        return []
    return mods


@contextmanager
def vision_in_segments(modules: Sequence[torch.nn.Module]):
    """Within the block, the vision tower's attention (``modules``: :func:`vision_modules`) runs
    as :func:`segments_attention`.

    Its modules get a copy of their config naming that function; the wrapped implementation
    is the one they named. Same numbers (tests compare the features with plain transformers).
    """
    with attention_as(modules, SEGMENTS) as inner:
        SEGMENT_STATE.inner = inner
        yield


def patch_embeddings(model) -> list[torch.nn.Module]:
    """The vision tower's patch embeddings whose ``Conv3d`` is a matrix product in disguise
    (kernel equal to stride, no padding, dilation or groups: each patch meets the kernel once)."""
    found = []
    for m in model.modules():
        proj = getattr(m, "proj", None)
        if not (
            type(m).__name__.endswith("VisionPatchEmbed") and isinstance(proj, torch.nn.Conv3d)
        ):
            continue
        if (
            tuple(proj.kernel_size) == tuple(proj.stride)
            and tuple(proj.padding) == (0, 0, 0)
            and tuple(proj.dilation) == (1, 1, 1)
            and proj.groups == 1
            and proj.padding_mode == "zeros"
        ):
            found.append(m)
    return found


@contextmanager
def forwards_replaced(modules: Sequence[torch.nn.Module], build):
    """Within the block, each of ``modules`` runs ``build(module)`` as its forward (an instance
    attribute, so hooks and ``__call__`` still apply; deleted after the block)."""
    for m in modules:
        m.forward = build(m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def patch_embedding_as_matmul(embeds: Sequence[torch.nn.Module]):
    """Within the block, each patch embedding (:func:`patch_embeddings`) multiplies the flat
    patches [patches, C*T*P*P] by its kernel as a [C*T*P*P, embed] matrix, where transformers
    runs ``Conv3d`` over patch-sized volumes. Same products; only the order of the sums differs
    (the features agree to float rounding; tests compare them with plain transformers)."""

    def matmul(embed):
        proj = embed.proj

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            w = proj.weight
            x = hidden_states.to(w.dtype).reshape(-1, w[0].numel())
            out = x @ w.reshape(w.shape[0], -1).t()
            return out if proj.bias is None else out + proj.bias

        return forward

    return forwards_replaced(embeds, matmul)


def _silu(act) -> bool:
    """``act`` is transformers' SiLU activation or torch's."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _mlp_in_place(mlp: torch.nn.Module):
    """``mlp``'s forward ``down(silu(gate(x)) * up(x))`` with the activation and the product
    written into ``gate(x)``'s output (a fresh tensor), where transformers allocates one tensor
    for each; the same kernels on the same numbers. Runs the module's own forward where
    autograd records (in-place steps and gradients do not mix)."""
    own = type(mlp).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return own(mlp, x)
        h = mlp.gate_proj(x)
        torch.nn.functional.silu(h, inplace=True)
        return mlp.down_proj(h.mul_(mlp.up_proj(x)))

    return forward


def _mlp_agrees(mlp: torch.nn.Module) -> bool:
    """The in-place forward gives ``mlp``'s own output bit for bit on a random input."""
    w = mlp.gate_proj.weight
    x = torch.randn(2, 7, w.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(w.device, w.dtype)
    with torch.inference_mode():
        return torch.equal(type(mlp).forward(mlp, x), _mlp_in_place(mlp)(x))


def gated_mlps(model) -> list[torch.nn.Module]:
    """The model's gated SiLU MLPs (``gate_proj``, ``up_proj``, ``down_proj`` linear, ``act_fn``
    SiLU: the decoder's and the Qwen2.5-VL vision tower's) whose forward the in-place one
    (:func:`mlps_in_place`) gives bit for bit; each class is checked once on a random input,
    and a class whose forward computes anything else is left out, as is a module whose forward
    something else replaced."""
    found, agrees = [], {}
    for m in model.modules():
        if not type(m).__name__.endswith("MLP") or not _silu(getattr(m, "act_fn", None)):
            continue
        if "forward" in vars(m):  # already wrapped (accelerate's hooks): left as it is
            continue
        parts = [getattr(m, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, torch.nn.Linear) for p in parts):
            continue
        key = (type(m), parts[0].weight.dtype)
        if key not in agrees:
            agrees[key] = _mlp_agrees(m)
        if agrees[key]:
            found.append(m)
    return found


def mlps_in_place(mlps: Sequence[torch.nn.Module]):
    """Within the block, ``mlps`` (:func:`gated_mlps`) run their in-place forward: one
    [positions, intermediate] tensor instead of three (3-4% of a generation's time here)."""
    return forwards_replaced(mlps, _mlp_in_place)


def _rotate_in_halves(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``t * cos + rotate_half(t) * sin`` without building ``rotate_half(t)``: with ``t = (a, b)``
    in halves, ``(a cos1 - b sin1, b cos2 + a sin2)``. The same products and sums, so the same
    bits (``x + (-y)`` is ``x - y``, ``(-b) s`` is ``-(b s)``)."""
    h = t.shape[-1] // 2
    out = t * cos
    out[..., :h] -= t[..., h:] * sin[..., :h]
    out[..., h:] += t[..., :h] * sin[..., h:]
    return out


def _rope_text(q, k, cos, sin, unsqueeze_dim=1):
    """Transformers' ``apply_rotary_pos_emb`` by :func:`_rotate_in_halves`."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate_in_halves(q, cos, sin), _rotate_in_halves(k, cos, sin)


def _rope_vision(q, k, cos, sin):
    """Transformers' ``apply_rotary_pos_emb_vision`` (float32 arithmetic) by :func:`_rotate_in_halves`."""
    dq, dk = q.dtype, k.dtype
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return (
        _rotate_in_halves(q.float(), cos, sin).to(dq),
        _rotate_in_halves(k.float(), cos, sin).to(dk),
    )


#: the rope functions :func:`rope_in_halves` replaces: name -> (replacement, the shapes of a
#: probe's query, key and cos/sin; decoder queries and keys are [rows, columns, heads, dim]
#: transposed to [rows, heads, columns, dim] as the attention passes them)
_ROPES = {
    "apply_rotary_pos_emb": (_rope_text, (3, 5, 4, 16), (3, 5, 2, 16), (3, 5, 16)),
    "apply_rotary_pos_emb_vision": (_rope_vision, (9, 4, 16), (9, 4, 16), (9, 16)),
}


def _rope_agrees(own, mine, shapes, dtype: torch.dtype, device: torch.device) -> bool:
    """``mine`` gives ``own``'s outputs bit for bit on a random probe of ``shapes`` (``dtype``,
    on ``device``)."""
    g = torch.Generator().manual_seed(0)
    q, k, cos, sin = (torch.randn(s, generator=g).to(device, dtype) for s in (*shapes, shapes[2]))
    if q.dim() == 4:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    try:
        a, b = own(q, k, cos, sin), mine(q, k, cos, sin)
    except (RuntimeError, TypeError, ValueError):
        return False
    return all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))


def rope_functions(model, dtype: torch.dtype | None = None) -> list[tuple[object, str]]:
    """(module, name) of the rope functions in the model's modeling module that
    :func:`rope_in_halves` replaces: ``apply_rotary_pos_emb`` (decoder) and
    ``apply_rotary_pos_emb_vision`` (Qwen2.5-VL's vision tower), each where the replacement
    gives the module's own function's numbers bit for bit on random inputs in ``dtype`` (None:
    the model's) on the model's device."""
    import sys

    mod = sys.modules.get(type(model).__module__)
    try:
        param = next(model.parameters())
    except StopIteration:
        return []
    dtype = dtype or param.dtype
    found = []
    for name, (mine, *shapes) in _ROPES.items():
        own = getattr(mod, name, None)
        if (
            callable(own)
            and own is not mine
            and _rope_agrees(own, mine, shapes, dtype, param.device)
        ):
            found.append((mod, name))
    return found


@contextmanager
def rope_in_halves(functions: Sequence[tuple[object, str]]):
    """Within the block, the modeling module's rope functions (:func:`rope_functions`) are
    :func:`_rotate_in_halves`' versions: two [.., dim/2] products instead of a rotated copy, a
    negated half and a concatenation (about 2% of a generation's time here). They are module
    globals, so the switch holds for every caller in the process while the block runs."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in functions]
    for mod, name, _ in saved:
        setattr(mod, name, _ROPES[name][0])
    try:
        yield
    finally:
        for mod, name, own in saved:
            setattr(mod, name, own)


def vision_geometry(modules: Sequence[torch.nn.Module], grid: torch.Tensor, memo: dict) -> dict:
    """The vision tower's inputs that depend on the patch grids alone (rope positions, window
    order, segment boundaries), as ``image_*`` keyword arguments of ``get_image_features``.

    Computed by transformers' own helpers, exactly as the tower would, and kept in ``memo`` per
    list of grids (at most 64): batches of equally sized images, the usual case, reuse them.
    Called while :func:`vision_in_segments` holds (the boundaries' maximum lengths depend on the
    attention implementation); empty where the tower is not Qwen2.5-VL's.
    """
    tower = next((m for m in modules if hasattr(m, "fullatt_block_indexes")), None)
    if tower is None:
        return {}
    key = tuple(grid.flatten().tolist())
    got = memo.get(key)
    if got is None:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        cu, longest = get_vision_attention_seqlens(grid, tower.config)
        window_index, cu_window = get_vision_window_index(
            grid,
            spatial_merge_size=tower.spatial_merge_size,
            window_size=tower.window_size,
            patch_size=tower.patch_size,
        )
        got = {
            "image_position_ids": get_vision_position_ids(grid, tower.spatial_merge_size),
            "image_cu_seqlens": cu,
            "image_max_seqlen": longest,
            "image_window_index": window_index,
            "image_cu_window_seqlens": cu_window,
            "image_max_window_seqlen": get_max_seqlen(cu_window, tower.config),
        }
        memo[key] = got
        while len(memo) > 64:
            memo.pop(next(iter(memo)))
    return dict(got)


def roomy_cache(
    n_layers: int, room: int, data: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
):
    """A ``DynamicCache`` of ``n_layers`` :class:`RoomyLayer` (each with ``room`` spare columns),
    holding ``data`` (per layer ``(keys, values)``) if given."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [RoomyLayer(room) for _ in range(n_layers)]
    for layer, (k, v) in zip(cache.layers, data or ()):
        layer.update(k, v)
    return cache


class KVBlock:
    """Key/value buffers shared by batches that are decoded together: per layer
    [``rows``, kv_heads, ``width`` + ``room``, head_dim], allocated by the first batch's first
    update (shape, dtype and device are its keys').

    Each batch takes the next rows (:meth:`take`); its ``m`` columns end at column ``width``
    (right-aligned, the columns on their left zeros, for the caller's attention mask to mask
    out). After the batches' first steps :meth:`cache` is the cache of all their rows, the
    ``room`` columns past ``width`` left for the decoding steps: the batches are decoded as one
    without copying their keys and values into a merged cache.
    """

    def __init__(self, n_layers: int, rows: int, width: int, room: int):
        self.n_layers, self.rows, self.width, self.room = n_layers, rows, width, room
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.used = 0  # rows taken
        self._taking: tuple[int, int] | None = None  # (first row, columns) of the last take

    def fits(self, rows: int, columns: int) -> bool:
        """Whether a batch of ``rows`` rows whose caches reach ``columns`` columns fits."""
        return self.used + rows <= self.rows and columns <= self.width

    def take(self, columns: int):
        """A roomy cache for the next batch, whose keys and values will fill ``columns`` columns
        (its first step), its layers writing into this block's next rows (as many as the batch's
        rows, known at its first update) with the block's ``room`` to spare. :meth:`close` it
        after the batch's first step."""
        from transformers import DynamicCache

        if columns > self.width:
            raise ValueError(f"KVBlock.take: {columns} columns, the block holds {self.width}")
        self._taking = (self.used, columns)
        cache = DynamicCache()
        cache.layers = [RoomyLayer(self.room, home=(self, i)) for i in range(self.n_layers)]
        return cache

    def _home(self, i: int, n: int, like_k: torch.Tensor, like_v: torch.Tensor):
        """Layer ``i``'s buffers for the ``n`` rows of the batch being taken: views of its rows,
        from the column its keys start at to the end (allocating the block's buffers at the first
        call: heads, head size, dtype and device as ``like_k``/``like_v``), the columns left of it
        zeroed."""
        if self._taking is None:
            raise RuntimeError("KVBlock: a layer wrote after its batch was closed")
        first, columns = self._taking
        if first + n > self.rows:
            raise ValueError(f"KVBlock: {first + n} rows, the block holds {self.rows}")
        if self.k[i] is None:
            self.k[i], self.v[i] = (
                t.new_empty((self.rows, t.shape[1], self.width + self.room, t.shape[-1]))
                for t in (like_k, like_v)
            )
        c0 = self.width - columns
        out = []
        for buf in (self.k[i], self.v[i]):
            mine = buf[first : first + n]
            mine[:, :, :c0] = 0
            out.append(mine[:, :, c0:])
        self.used = max(self.used, first + n)
        return out

    def widen(self, width: int) -> None:
        """Make the block ``width`` columns wide (at least its width): the rows taken are copied
        into new buffers, right-aligned as before (one copy; for a batch wider than the block)."""
        if self._taking is not None:
            raise RuntimeError("KVBlock.widen: a batch is being taken")
        extra = width - self.width
        if extra <= 0:
            return
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                if old is None:
                    continue
                new = old.new_empty((self.rows, old.shape[1], width + self.room, old.shape[-1]))
                new[: self.used, :, :extra] = 0
                new[: self.used, :, extra:width] = old[: self.used, :, : self.width]
                bufs[i] = new
        self.width = width

    def close(self, keep: bool = True) -> None:
        """The batch being taken is complete (``keep``: its rows stay taken), or given up (its
        rows are free again): no layer may write for it any more."""
        if self._taking is not None and not keep:
            self.used = self._taking[0]
        self._taking = None

    def cache(self):
        """A roomy cache of the rows taken, ``width`` columns filled, ``room`` to spare."""
        from transformers import DynamicCache

        merged = DynamicCache()
        merged.layers = []
        for k, v in zip(self.k, self.v):
            layer = RoomyLayer(self.room)
            layer._k, layer._v = k[: self.used], v[: self.used]
            layer.device, layer.is_initialized, layer.n = k.device, True, self.width
            layer._views()
            merged.layers.append(layer)
        return merged


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values sit in buffers with ``room`` spare columns past
    the first update, so that later updates (a decoding step's one column) are written in
    place; ``DynamicLayer`` concatenates, copying the whole cache at every generated token.
    ``keys``/``values`` are views of the filled columns (what attention and callers read).
    With ``home`` (a :class:`KVBlock` and a layer index) the buffers are the block's.
    """

    def __init__(self, room: int, home: tuple[KVBlock, int] | None = None):
        super().__init__()
        self.room = int(room)
        self.home = home
        self.n = 0

    def reserve(self, rows: int, like_k: torch.Tensor, like_v: torch.Tensor, m: int):
        """Buffers for ``rows`` rows and ``m`` columns (heads, head size, dtype and device as
        ``like_k``/``like_v``), for the caller to fill in place, as if a first update had
        written them: (keys, values) views of those columns."""
        if self.is_initialized:
            raise RuntimeError("RoomyLayer.reserve: the layer already holds columns")
        self._allocate(rows, like_k, like_v, m)
        self.n = m
        self._views()
        return self.keys, self.values

    def _allocate(self, rows: int, like_k: torch.Tensor, like_v: torch.Tensor, m: int) -> None:
        self.device = like_k.device
        if self.home is not None:
            block, i = self.home
            self._k, self._v = block._home(i, rows, like_k, like_v)
            if self._k.shape[-2] < m + self.room:
                raise ValueError("RoomyLayer: more columns than its block's batch took")
        else:
            self._k, self._v = (
                t.new_empty((rows, t.shape[1], m + self.room, t.shape[-1]))
                for t in (like_k, like_v)
            )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        m = key_states.shape[-2]
        if not self.is_initialized:
            self._allocate(key_states.shape[0], key_states, value_states, m)
        elif self.n + m > self._k.shape[-2]:  # out of room: grow (never in the backend's use)
            if self.home is not None:
                raise RuntimeError("RoomyLayer: out of room in its block")
            self._k = torch.cat(
                [
                    self._k[..., : self.n, :],
                    key_states.new_empty((*self._k.shape[:2], m + self.room, self._k.shape[-1])),
                ],
                -2,
            )
            self._v = torch.cat(
                [
                    self._v[..., : self.n, :],
                    value_states.new_empty((*self._v.shape[:2], m + self.room, self._v.shape[-1])),
                ],
                -2,
            )
        self._k[..., self.n : self.n + m, :] = key_states
        self._v[..., self.n : self.n + m, :] = value_states
        self.n += m
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self._k[..., : self.n, :], self._v[..., : self.n, :]

    def get_seq_length(self) -> int:
        return self.n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self.n = max(0, self.n + tokens_to_remove)
            self._views()
        elif tokens_to_remove > 0:
            raise ValueError("RoomyLayer.crop: pass a negative number of tokens to remove")

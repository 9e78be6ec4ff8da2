"""The pointer selector (docs/science.md §7; the reference implementation's "v2"/"v3" model).

Input projection d→H, L cross-attention layers in which the query attends over its pool
(residual + LayerNorm), query/candidate projections, L2-normalised dot product divided by a
temperature. The pool scores are computed once per query; decoding step t takes the logits over
the pool with padding and already-chosen items masked to −inf (teacher forcing in training,
greedy argmax at inference), so any k ≤ pool size can be selected whatever depth was trained.

Shapes: query [B, d], pool [B, K, d], ``pool_mask`` [B, K] (True = real item; pools of
different sizes are padded), sequences [B, N, T] of pool positions padded with −1 at the end.
Unbatched inputs (query [d], pool [K, d]) are accepted where noted.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG_INF = float("-inf")


class TeacherForcing(NamedTuple):
    """What :meth:`PointerSelector.step_log_probs` gives for sequences [B, N, T] over pools of K."""

    logits: Tensor  # [B, N, T, K] pool logits, −inf at padding and at items chosen earlier
    logp_all: Tensor  # [B, N, T, K] log-softmax of ``logits`` per step
    avail: Tensor  # [B, N, T, K] bool, the items still available at each step
    picked: Tensor  # [B, N, T] log-prob of each step's label (meaningless at padding steps)
    valid: Tensor  # [B, N, T] bool, the real (non-padding) steps

    @property
    def seq_logp(self) -> Tensor:
        """[B, N] log-prob of each whole sequence: ``picked`` summed over its real steps."""
        return torch.where(self.valid, self.picked, torch.zeros_like(self.picked)).sum(-1)


class CrossAttention(nn.Module):
    """Multi-head attention of one query vector over a pool, computed in input space.

    Standard attention ``o(softmax(q·(W_k h_j + b_k)/√d_h) · (W_v h_j + b_v))`` over the pool's
    hidden vectors h_j = W_in c_j, rearranged for a single query: the key projection is moved
    onto the query (q·W_k h_j = (W_in^T W_k^T q)·c_j) and the value projection after the
    weighted sum (Σ_j a_j W_v h_j = W_v W_in Σ_j a_j c_j). Same function, but no per-item H×H
    products. Written with explicit ops (not ``nn.MultiheadAttention``) so grad and no-grad
    calls take the same kernels: PPO ratios must be exactly 1 at identical weights.
    """

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pool: Tensor, pool_mask: Tensor, w_in: Tensor) -> Tensor:
        """x [B, H] attends over the pool [B, K, d] (hidden vectors ``pool @ w_in.T``); returns [B, H]."""
        b = x.shape[0]
        h = x.shape[1]
        nh, dh = self.heads, h // self.heads
        q = self.q(x).view(b, nh, dh)
        wk = self.k.weight.view(nh, dh, h)
        qk = torch.einsum("bnd,ndh->bnh", q, wk)  # W_k^T q per head, [B, nh, H]
        q_bias = (q * self.k.bias.view(nh, dh)).sum(-1)  # q·b_k, [B, nh]
        q_in = qk @ w_in  # into input space, [B, nh, d]
        att = (torch.einsum("bkd,bnd->bnk", pool, q_in) + q_bias.unsqueeze(-1)) / math.sqrt(dh)
        att = att.masked_fill(~pool_mask[:, None, :], NEG_INF)
        att = self.drop(torch.softmax(att, dim=-1))  # [B, nh, K]
        ctx = (att @ pool) @ w_in.t()  # Σ_j a_j h_j per head, [B, nh, H]
        wv = self.v.weight.view(nh, dh, h)
        out = torch.einsum("bnh,ndh->bnd", ctx, wv) + self.v.bias.view(nh, dh) * att.sum(
            -1, keepdim=True
        )
        return self.o(out.reshape(b, h))


class PointerSelector(nn.Module):
    """Scores a query's pool and decodes an ordered sequence of pool positions."""

    def __init__(
        self,
        d_in: int,
        hidden_size: int = 256,
        num_layers: int = 1,
        num_heads: int = 1,
        dropout: float = 0.1,
        temperature: float = 0.1,
    ):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config: dict[str, Any] = {
            "d_in": int(d_in),
            "hidden_size": int(hidden_size),
            "num_layers": int(num_layers),
            "num_heads": int(num_heads),
            "dropout": float(dropout),
            "temperature": float(temperature),
        }
        self.temperature = float(temperature)
        self.input_proj = nn.Linear(d_in, hidden_size, bias=False)
        self.layers = nn.ModuleList(
            CrossAttention(hidden_size, num_heads, dropout) for _ in range(num_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        self.query_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.cand_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.drop = nn.Dropout(dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.xavier_uniform_(self.input_proj.weight)
        for lin in (self.query_proj, self.cand_proj):  # near-identity: start as cosine retrieval
            nn.init.eye_(lin.weight)
            with torch.no_grad():
                lin.weight.add_(0.01 * torch.randn_like(lin.weight))

    def set_dropout(self, p: float) -> None:
        """Change every dropout probability (e.g. for the RL stages) and record it in ``config``."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        for mod in self.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = float(p)
        self.config["dropout"] = float(p)

    # ------------------------------------------------------------------ scoring

    @staticmethod
    def _batch(
        query: Tensor, pool: Tensor, pool_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, bool]:
        single = query.dim() == 1
        if single:
            query, pool = query.unsqueeze(0), pool.unsqueeze(0)
            pool_mask = None if pool_mask is None else pool_mask.unsqueeze(0)
        if query.dim() != 2 or pool.dim() != 3 or pool.shape[0] != query.shape[0]:
            raise ValueError(
                f"expected query [B, d] and pool [B, K, d], "
                f"got {tuple(query.shape)} and {tuple(pool.shape)}"
            )
        if pool_mask is None:
            pool_mask = torch.ones(pool.shape[:2], dtype=torch.bool, device=pool.device)
        pool_mask = pool_mask.to(torch.bool)
        if not bool(pool_mask.any(-1).all()):
            raise ValueError("every query needs at least one pool item (pool_mask row all False)")
        return query, pool, pool_mask, single

    def scores(self, query: Tensor, pool: Tensor, pool_mask: Tensor | None = None) -> Tensor:
        """Pool logits [B, K] (cosine / temperature), −inf at padding. Unbatched input → [K]."""
        query, pool, pool_mask, single = self._batch(query, pool, pool_mask)
        w_in = self.input_proj.weight  # [H, d]
        x = self.input_proj(query)
        for attn, norm in zip(self.layers, self.norms):
            x = norm(x + self.drop(attn(x, pool, pool_mask, w_in)))
        qv = F.normalize(self.drop(self.query_proj(x)), dim=-1)
        b, k, d = pool.shape
        if b * k > d:
            # many pool rows: fold the two projections once (H·H·d) and apply them in one product
            cand = pool @ (self.cand_proj.weight @ w_in).t()
        else:
            cand = self.cand_proj(self.input_proj(pool))
        cand = self.drop(cand)
        # cosine = (c·q̂)/‖c‖: dot products first, so no normalised [B, K, H] copy is made
        dot = (cand @ qv.unsqueeze(-1)).squeeze(-1)
        s = dot / (cand.norm(dim=-1).clamp_min(1e-12) * self.temperature)
        s = s.masked_fill(~pool_mask, NEG_INF)
        return s[0] if single else s

    @staticmethod
    def step_log_probs(scores: Tensor, seqs: Tensor) -> TeacherForcing:
        """Teacher forcing: the one computation of step logits and log-probs of given sequences.

        scores [B, K] (−inf = unavailable), seqs [B, N, T] (−1 = padding step). At step t the
        items chosen at steps < t are unavailable. :meth:`sequence_logprob`, :meth:`forward`
        and the v2 loss (:func:`icdrl.train.sft_loss`) all read their values from here.
        """
        b, k = scores.shape
        valid = seqs >= 0
        idx = seqs.clamp_min(0)
        onehot = F.one_hot(idx, k) * valid.unsqueeze(-1)  # [B, N, T, K] int64
        chosen_before = (onehot.cumsum(dim=2) - onehot) > 0
        avail = torch.isfinite(scores)[:, None, None, :] & ~chosen_before
        logits = scores[:, None, None, :].masked_fill(~avail, NEG_INF)
        logp_all = torch.log_softmax(logits, dim=-1)
        picked = torch.gather(logp_all, 3, idx.unsqueeze(-1)).squeeze(-1)  # [B, N, T]
        return TeacherForcing(logits, logp_all, avail, picked, valid)

    @staticmethod
    def check_sequences(seqs: Tensor, pool_mask: Tensor) -> None:
        """Raise if a sequence repeats an item, points outside its pool, or pads mid-sequence."""
        b, k = pool_mask.shape
        valid = seqs >= 0
        if bool((seqs >= k).any()):
            raise ValueError(f"a sequence position is ≥ the pool size {k}")
        if seqs.shape[-1] > 1 and bool((~valid[..., :-1] & valid[..., 1:]).any()):
            raise ValueError("padding (−1) inside a sequence; pad only at the end")
        idx = seqs.clamp_min(0)
        in_pool = torch.gather(pool_mask[:, None, :].expand(-1, seqs.shape[1], -1), 2, idx)
        if bool((valid & ~in_pool).any()):
            raise ValueError("a sequence points at a padded (non-existent) pool item")
        onehot = F.one_hot(idx, k) * valid.unsqueeze(-1)
        if bool((onehot.sum(dim=2) > 1).any()):
            raise ValueError("a sequence repeats a pool item")

    def sequence_logprob(
        self,
        query: Tensor,
        pool: Tensor,
        seqs: Tensor,
        pool_mask: Tensor | None = None,
        *,
        check: bool = True,
    ) -> Tensor:
        """log π(y) = Σ_t log softmax(logits_t)[y_t] for each sequence.

        seqs [B, N, T] → [B, N]; seqs [B, T] → [B]; unbatched (query [d], pool [K, d],
        seqs [N, T]) → [N]. Padding steps (−1) add 0; an all-padding sequence has log-prob 0.
        """
        if query.dim() == 1:
            if seqs.dim() != 2:
                raise ValueError("unbatched sequence_logprob expects seqs [N, T]")
            return self.sequence_logprob(
                query.unsqueeze(0),
                pool.unsqueeze(0),
                seqs.unsqueeze(0),
                None if pool_mask is None else pool_mask.unsqueeze(0),
                check=check,
            )[0]
        query, pool, pool_mask, _ = self._batch(query, pool, pool_mask)
        squeeze = seqs.dim() == 2
        seqs = seqs.unsqueeze(1) if squeeze else seqs
        seqs = seqs.to(device=pool.device, dtype=torch.long)
        if check:
            self.check_sequences(seqs, pool_mask)
        lp = self.step_log_probs(self.scores(query, pool, pool_mask), seqs).seq_logp
        return lp[:, 0] if squeeze else lp

    def forward(
        self,
        query: Tensor,
        pool: Tensor,
        pool_mask: Tensor | None = None,
        labels: Tensor | None = None,
        k: int | None = None,
    ) -> dict[str, Tensor]:
        """Step logits with teacher forcing (``labels`` [B, T]) or greedy decoding (``k`` steps).

        Returns ``logits`` [B, T, K] (−inf at padding and at items chosen earlier),
        ``predictions`` [B, T] (argmax per step) and, with labels, ``logp`` [B] of the labels
        (as :meth:`sequence_logprob`: both come from :meth:`step_log_probs`).
        """
        query, pool, pool_mask, _ = self._batch(query, pool, pool_mask)
        s = self.scores(query, pool, pool_mask)
        if labels is None:
            if k is None:
                raise ValueError("forward needs labels (teacher forcing) or k (greedy steps)")
            seq = self.greedy(s.detach(), k)
            return {
                "logits": self.step_log_probs(s, seq.unsqueeze(1)).logits[:, 0],
                "predictions": seq,
            }
        labels = labels.to(device=pool.device, dtype=torch.long)
        self.check_sequences(labels.unsqueeze(1), pool_mask)
        tf = self.step_log_probs(s, labels.unsqueeze(1))
        logits = tf.logits[:, 0]
        logp = tf.seq_logp[:, 0]
        return {"logits": logits, "predictions": logits.argmax(-1), "logp": logp}

    @staticmethod
    def greedy(scores: Tensor, k: int, allow_short: bool = False) -> Tensor:
        """Greedy decoding on static pool scores: k steps of masked argmax (ties → lowest position).

        A pool with fewer than k items raises, or with ``allow_short`` gets −1 for the missing steps.
        """
        n_avail = torch.isfinite(scores).sum(-1)
        if k < 0 or (not allow_short and bool((n_avail < k).any())):
            raise ValueError(f"cannot select k={k} items from a pool of {int(n_avail.min())}")
        s = scores.clone()
        out = []
        for _ in range(k):
            pick = s.argmax(-1)
            ok = torch.isfinite(s.gather(1, pick.unsqueeze(1))).squeeze(1)
            out.append(torch.where(ok, pick, torch.full_like(pick, -1)))
            s = s.scatter(1, pick.unsqueeze(1), NEG_INF)
        if not out:
            return torch.zeros((scores.shape[0], 0), dtype=torch.long, device=scores.device)
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def select(
        self, query: Tensor, pool: Tensor, k: int, pool_mask: Tensor | None = None
    ) -> Tensor:
        """Greedy selection of k pool positions, [B, k] (or [k] unbatched), in eval mode."""
        was_training = self.training
        self.eval()
        try:
            s = self.scores(query, pool, pool_mask)
            single = s.dim() == 1
            seq = self.greedy(s.unsqueeze(0) if single else s, k)
        finally:
            self.train(was_training)
        return seq[0] if single else seq

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Atomically write ``{"config": {"model": ..., **extra}, "state_dict": ...}``.

        Serialised through a buffer, so the bytes do not depend on the file name: the same
        weights and config give the same file.
        """
        from icdrl.records import atomic_path

        cfg = {"model": dict(self.config), **(extra or {})}
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        buf = io.BytesIO()
        torch.save({"config": cfg, "state_dict": state}, buf)
        with atomic_path(path, suffix=".pt") as tmp:
            tmp.write_bytes(buf.getvalue())

    @classmethod
    def load(
        cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> PointerSelector:
        """Rebuild a selector from a checkpoint written by :meth:`save` (returned in eval mode)."""
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            from icdrl.records import corrupt_file_error

            raise corrupt_file_error(path, e) from None
        if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
            raise ValueError(f"{path}: not a selector checkpoint (needs 'config' and 'state_dict')")
        mcfg = ckpt["config"].get("model")
        if not isinstance(mcfg, dict):
            raise ValueError(f"{path}: checkpoint config lacks the 'model' section")
        model = cls(**mcfg)
        model.load_state_dict(ckpt["state_dict"])
        model.checkpoint_config = ckpt["config"]
        return model.eval()


def select_for_query(model: PointerSelector, query_vec: Any, pool_vecs: Any, k: int) -> list[int]:
    """Greedy k pool positions for one query (numpy or torch inputs: [d] and [K, d])."""
    p = next(model.parameters())
    q = torch.as_tensor(query_vec, dtype=p.dtype, device=p.device)
    pool = torch.as_tensor(pool_vecs, dtype=p.dtype, device=p.device)
    if q.dim() != 1 or pool.dim() != 2 or pool.shape[1] != q.shape[0]:
        raise ValueError(
            f"select_for_query expects query [d] and pool [K, d], "
            f"got {tuple(q.shape)} and {tuple(pool.shape)}"
        )
    if not 0 <= k <= pool.shape[0]:
        raise ValueError(f"cannot select k={k} items from a pool of {pool.shape[0]}")
    return [int(i) for i in model.select(q, pool, k)]


# ---------------------------------------------------------------------------- label order (docs/science.md §7)

#: ``prompt``: taught the ICDs in prompt order (the reference implementation's); ``selection``:
#: in the order beam search chose them (best single ICD first)
LABEL_ORDERS = ("prompt", "selection")


def _check_order(label_order: str, insert: str) -> None:
    if label_order not in LABEL_ORDERS:
        raise ValueError(f"label_order must be one of {LABEL_ORDERS}, got {label_order!r}")
    if insert not in ("first", "last"):
        raise ValueError(f"insert must be 'first' or 'last', got {insert!r}")


def label_sequence(prompt_seq: tuple[int, ...], label_order: str, insert: str) -> tuple[int, ...]:
    """The order a selector is taught a candidate sequence given in prompt order.

    With ``insert: first`` each new ICD went to the front, so the selection order is the prompt
    order reversed; with ``insert: last`` the two coincide.
    """
    _check_order(label_order, insert)
    seq = tuple(prompt_seq)
    return seq[::-1] if label_order == "selection" and insert == "first" else seq


def prompt_sequence(picks: list[int], label_order: str, insert: str) -> list[int]:
    """The prompt order of a selector's k picks: as picked (``prompt``), or placed one by one by
    the ``insert`` rule (``selection``: with ``first`` the first pick ends nearest the query)."""
    _check_order(label_order, insert)
    return list(picks)[::-1] if label_order == "selection" and insert == "first" else list(picks)

"""Deterministic fakes shared by the pipeline-stage tests (embeddings, pools, beam, scoring, evaluate)."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np

from icdrl.data import Example
from icdrl.lvlm.base import AnswerScore, Generation
from icdrl.lvlm.prompt import postprocess


def h(*xs) -> float:
    """A deterministic pseudo-random float in [0, 1) from the arguments."""
    d = hashlib.sha256(repr(xs).encode()).digest()
    return int.from_bytes(d[:8], "big") / 2**64


def fake_logit(demos, query) -> float:
    """Non-additive in the demos (order and pair interactions matter)."""
    z = -1.0 + 0.5 * h("q", query.id)
    n = len(demos)
    for i, d in enumerate(demos):
        dist = n - i  # 1 = nearest the query
        z += (h("w", d.id, query.id) - 0.4) * (1.5 / dist)
    for a, b in zip(demos, demos[1:]):
        z += 0.6 * (h("pair", a.id, b.id) - 0.5)
    return z


class FakeBackend:
    """LVLMBackend with a deterministic answer probability; counts calls and prompts per query.

    ``fail_after``: raise after this many ``answer_logprobs``/``generate`` calls (a killed job);
    ``fail_at_query``: raise at the second ``answer_logprobs`` call for this query (mid-anchor).
    """

    def __init__(self, fail_after: int | None = None, fail_at_query: int | None = None):
        self.fail_after = fail_after
        self.fail_at_query = fail_at_query
        self.query_calls: Counter = Counter()
        self.calls = 0
        self.gen_calls = 0
        self.prompts = 0
        self.per_query: Counter = Counter()
        self.gen_prompts: list = []

    def answer_logprobs(self, prompts, answers):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        for qid in {q.id for _, q in prompts}:
            self.query_calls[qid] += 1
            if qid == self.fail_at_query and self.query_calls[qid] == 2:
                raise RuntimeError("killed")
        out = []
        for (demos, q), a in zip(prompts, answers):
            self.prompts += 1
            self.per_query[q.id] += 1
            n_tok = max(len(a.split()), 1)
            mean = -math.log1p(math.exp(-fake_logit(demos, q)))  # log sigmoid
            out.append(AnswerScore(sum_logprob=mean * n_tok, n_tokens=n_tok))
        return out

    def generate(self, prompts, max_new_tokens=None):
        if self.fail_after is not None and self.gen_calls >= self.fail_after:
            raise RuntimeError("killed")
        self.gen_calls += 1
        out = []
        for demos, q in prompts:
            self.gen_prompts.append(([d.id for d in demos], q.id))
            p = 1.0 / (1.0 + math.exp(-fake_logit(demos, q)))
            ans = q.answers[0] if p > 0.45 else q.answers[-1] if p > 0.35 else "nothing"
            raw = f" {ans.upper()}\nQuestion: what?"
            out.append(Generation(raw=raw, answer=postprocess(raw)))
        return out


def make_examples(
    n: int, start: int = 0, *, images: list[str] | None = None, dup_of: dict[int, int] | None = None
):
    """``n`` examples with ids start..start+n-1; ``dup_of[i] = j`` makes i an exact duplicate of j's image+question."""
    exs = []
    for i in range(start, start + n):
        src = (dup_of or {}).get(i, i)
        answers = tuple([f"ans{src % 5}"] * 7 + [f"alt{src % 3}"] * 3)
        exs.append(
            Example(
                id=i,
                image=images[src % len(images)] if images else f"/nonexistent/img{src}.png",
                question=f"question number {src} ?",
                answers=answers,
                answer=answers[0],
                image_id=f"img{src}",
            )
        )
    return exs


def random_table(ids, dim: int = 8, seed: int = 0):
    """An in-memory EmbeddingTable with random normalised img/txt/emb."""
    from icdrl.embeddings import EmbeddingTable, combine, l2_normalize

    rng = np.random.default_rng(seed)
    img = l2_normalize(rng.normal(size=(len(ids), dim)))
    txt = l2_normalize(rng.normal(size=(len(ids), dim)))
    return EmbeddingTable(ids=np.array(ids), emb=combine(img, txt), img=img, txt=txt)


def save_table(table, path):
    from icdrl.embeddings import save_embeddings

    return save_embeddings(path, table.ids, table.img, table.txt)


def patch_dataset(monkeypatch, splits: dict[str, list[Example]]):
    """Make ``icdrl.data.load_dataset(cfg, split)`` return the given in-memory splits."""
    import icdrl.data

    def load_dataset(cfg, split):
        return list(splits[split])

    monkeypatch.setattr(icdrl.data, "load_dataset", load_dataset, raising=False)

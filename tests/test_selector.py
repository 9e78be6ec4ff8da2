"""PointerSelector (docs/science.md §7): scoring, masking, teacher forcing, greedy decoding, persistence."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icdrl.selector import PointerSelector, select_for_query

D = 12


def _model(**kw) -> PointerSelector:
    torch.manual_seed(0)
    m = PointerSelector(D, hidden_size=kw.pop("hidden_size", 16), **kw)
    with torch.no_grad():  # move off the near-identity init so every weight matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _data(b=3, k=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g), torch.randn(b, k, D, generator=g)


def _reference_scores(m: PointerSelector, q, pool, pm):
    """Textbook multi-head cross-attention selector, written independently of the module."""
    hq, hc = m.input_proj(q), m.input_proj(pool)
    x = hq
    for att, norm in zip(m.layers, m.norms):
        b, k, h = hc.shape
        nh, dh = att.heads, h // att.heads
        qq = att.q(x).view(b, nh, 1, dh)
        kk = att.k(hc).view(b, k, nh, dh).transpose(1, 2)
        vv = att.v(hc).view(b, k, nh, dh).transpose(1, 2)
        a = (qq @ kk.transpose(-1, -2)) / math.sqrt(dh)
        a = a.masked_fill(~pm[:, None, None, :], float("-inf")).softmax(-1)
        x = norm(x + att.o((a @ vv).reshape(b, h)))
    qv = F.normalize(m.query_proj(x), dim=-1)
    cv = F.normalize(m.cand_proj(hc), dim=-1)
    s = (cv @ qv.unsqueeze(-1)).squeeze(-1) / m.temperature
    return s.masked_fill(~pm, float("-inf"))


@pytest.mark.parametrize("heads,layers,k", [(1, 1, 7), (4, 2, 7), (2, 1, 2)])
def test_scores_match_textbook_cross_attention(heads, layers, k):
    # k = 7 with B = 3 exercises the folded projection (B·K > d), k = 2 the plain one
    m = _model(num_heads=heads, num_layers=layers)
    q, pool = _data(k=k)
    pm = torch.ones(3, k, dtype=torch.bool)
    pm[0, -1] = False
    got = m.scores(q, pool, pm)
    want = _reference_scores(m, q, pool, pm)
    assert torch.equal(torch.isinf(got), ~pm)
    assert torch.allclose(got[pm], want[pm], atol=1e-5)
    assert (got.abs()[pm] <= 1 / m.temperature + 1e-4).all()  # cosine / temperature


def test_sequence_logprob_is_sum_of_masked_step_log_softmax():
    m = _model()
    q, pool = _data()
    seqs = torch.tensor([[[0, 3], [6, 0]], [[2, 1], [1, 2]], [[4, 5], [5, -1]]])
    lp = m.sequence_logprob(q, pool, seqs)
    s = m.scores(q, pool)
    for b in range(3):
        for n in range(2):
            want, chosen = 0.0, []
            for y in seqs[b, n].tolist():
                if y < 0:
                    break
                logits = s[b].clone()
                logits[chosen] = float("-inf")
                want += torch.log_softmax(logits, -1)[y].item()
                chosen.append(y)
            assert lp[b, n].item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_sequence_probabilities_sum_to_one():
    m = _model()
    q, pool = _data(b=1, k=5)
    for depth in (1, 2, 3):
        allseq = torch.tensor(list(itertools.permutations(range(5), depth)))
        p = m.sequence_logprob(q[0], pool[0], allseq).double().exp().sum()
        assert p.item() == pytest.approx(1.0, abs=1e-5)


def test_ragged_pools_match_unpadded_and_padding_is_never_chosen():
    m = _model()
    q, pool = _data(b=2, k=6)
    pm = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    seqs = torch.tensor([[[5, 4], [0, 1]], [[2, 0], [1, -1]]])
    lp = m.sequence_logprob(q, pool, seqs, pm)
    alone = m.sequence_logprob(q[1:], pool[1:, :3], seqs[1:])
    assert torch.allclose(lp[1], alone[0], atol=1e-5)
    sel = m.select(q, pool, 3, pm)
    assert set(sel[1].tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="padded"):
        m.sequence_logprob(q, pool, torch.tensor([[[0, 1]], [[4, 0]]]), pm)


def test_teacher_forcing_masks_chosen_items():
    m = _model()
    q, pool = _data()
    labels = torch.tensor([[3, 1, 0], [0, 6, 2], [5, 4, 1]])
    out = m(q, pool, labels=labels)
    logits = out["logits"]
    assert logits.shape == (3, 3, 7)
    for b in range(3):
        for t in range(3):
            for prev in labels[b, :t].tolist():
                assert logits[b, t, prev] == float("-inf")
            assert torch.isfinite(logits[b, t, labels[b, t]])
    assert torch.allclose(out["logp"], m.sequence_logprob(q, pool, labels))


def test_greedy_select_any_k_up_to_pool_size():
    m = _model()
    q, pool = _data(k=7)
    s = m.scores(q, pool)
    for k in range(0, 8):
        sel = m.select(q, pool, k)
        assert sel.shape == (3, k)
        assert all(len(set(row)) == k for row in sel.tolist())
        assert torch.equal(sel, torch.argsort(s, dim=-1, descending=True, stable=True)[:, :k])
    out = m(q, pool, k=4)
    assert torch.equal(out["predictions"], m.select(q, pool, 4))
    with pytest.raises(ValueError, match="k=8"):
        m.select(q, pool, 8)


def test_eval_is_deterministic_and_grad_mode_does_not_change_values():
    # the PPO ratio needs identical log-probs at identical weights (docs/defects.md defect 5)
    m = _model(dropout=0.5)
    q, pool = _data(k=40)  # folded path
    seqs = torch.tensor([[[0, 1], [2, 3]]] * 3)
    m.eval()
    with_grad = m.sequence_logprob(q, pool, seqs)
    with torch.no_grad():
        no_grad = m.sequence_logprob(q, pool, seqs)
    assert torch.equal(with_grad, no_grad)
    m.train()
    a, b = m.sequence_logprob(q, pool, seqs), m.sequence_logprob(q, pool, seqs)
    assert not torch.equal(a, b)  # dropout is live in training mode


def test_invalid_sequences_raise():
    m = _model()
    q, pool = _data()
    with pytest.raises(ValueError, match="repeats"):
        m.sequence_logprob(q, pool, torch.tensor([[1, 1]] * 3))
    with pytest.raises(ValueError, match="pool size"):
        m.sequence_logprob(q, pool, torch.tensor([[1, 7]] * 3))
    with pytest.raises(ValueError, match="padding"):
        m.sequence_logprob(q, pool, torch.tensor([[-1, 2]] * 3))
    with pytest.raises(ValueError, match="at least one pool item"):
        m.scores(q, pool, torch.zeros(3, 7, dtype=torch.bool))


def test_save_load_and_select_for_query(tmp_path):
    m = _model(num_heads=2, num_layers=2, dropout=0.3, temperature=0.2)
    path = tmp_path / "sel.pt"
    m.save(path, {"phase": "v2", "epoch": 3})
    m2 = PointerSelector.load(path)
    assert m2.config == m.config and m2.checkpoint_config["epoch"] == 3 and not m2.training
    q, pool = _data(b=1, k=9)
    assert torch.equal(m.scores(q, pool), m2.scores(q, pool))
    got = select_for_query(m2, q[0].numpy(), pool[0].numpy().astype(np.float64), 4)
    assert got == m.select(q[0], pool[0], 4).tolist() and all(isinstance(i, int) for i in got)
    assert len(select_for_query(m2, q[0], pool[0], 9)) == 9
    with pytest.raises(ValueError):
        select_for_query(m2, q[0], pool[0], 10)
    torch.save({"state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="config"):
        PointerSelector.load(tmp_path / "bad.pt")


def test_set_dropout():
    m = _model(dropout=0.1)
    m.set_dropout(0.5)
    assert m.config["dropout"] == 0.5
    assert all(mod.p == 0.5 for mod in m.modules() if isinstance(mod, torch.nn.Dropout))

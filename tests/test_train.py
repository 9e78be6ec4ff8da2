"""Selector training (docs/science.md §7): configs, loaders, v2 and v3 loops; docs/defects.md defects 3, 5–8, 11."""

from __future__ import annotations

import csv
import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icdrl import groups as G
from icdrl import rewards as R
from icdrl import train as T
from icdrl.embeddings import EmbeddingTable
from icdrl.records import check_csv_complete, write_jsonl
from icdrl.selector import PointerSelector
from icdrl.synthetic import synthetic_groups

SMALL_V2 = dict(hidden_size=16, epochs=2, batch_queries=8, val_fraction=0.25)
SMALL_V3 = dict(rce_epochs=1, grpo_epochs=2, batch_queries=8, val_fraction=0.25)


def _syn(n_groups=24, n_cands=6, pool_size=10, depth=2, dim=8, seed=0, mode="hard_plus_soft_v2"):
    return synthetic_groups(
        n_groups=n_groups,
        n_cands=n_cands,
        pool_size=pool_size,
        depth=depth,
        dim=dim,
        seed=seed,
        mode=mode,
    )


def _model(dim=8, hidden=16, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    return PointerSelector(dim, hidden_size=hidden, dropout=dropout)


def _write_files(tmp_path, syn, mode="hard_plus_soft_v2"):
    """Candidates, scored, rewards and embeddings files holding the synthetic groups."""
    recs = []
    for g in syn.groups:
        recs.append(
            {
                "anchor_id": g.query_id,
                "pool": list(g.pool),
                "zero_shot_logprob": -1.0,
                "zero_shot_prob": 0.3,
                "candidates": [
                    {
                        "source": src,
                        "icd_ids": [g.pool[p] for p in s],
                        "icd_pos": list(s),
                        "info_score": info,
                        "step_gains": [info / len(s)] * len(s),
                    }
                    for s, src, info in zip(g.seqs, g.sources, g.info)
                ],
            }
        )
    write_jsonl(tmp_path / "cands.jsonl", "icdrl.candidates", recs)
    for rec, g in zip(recs, syn.groups):
        for c, h in zip(rec["candidates"], g.hard):
            c.update(
                prediction_raw="a",
                prediction="a",
                vqa_correct=int(h),
                vqa_acc_score=float(np.clip(0.5 + 2 * c["info_score"], 0, 1)),
            )
    write_jsonl(tmp_path / "scored.jsonl", "icdrl.scored", recs)
    R.write_rewards(tmp_path / "scored.jsonl", mode, out_path=tmp_path / "rewards.jsonl")
    np.savez(tmp_path / "emb.npz", ids=syn.table.ids, emb=syn.table.emb)
    return tmp_path


def _read_csv(path):
    n = check_csv_complete(path)
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if not r["phase"].startswith("#")]
    assert len(rows) == n
    return rows


# ============================================================================ configs


def test_configs_reject_unknown_keys_and_bad_types():
    with pytest.raises(ValueError, match="unknown V2Config key 'lr_rate'") as e:
        T.V2Config.from_dict({"lr_rate": 1e-3})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="V3Config.grpo_epochs must be an integer"):
        T.V3Config.from_dict({"grpo_epochs": 2.5})
    with pytest.raises(ValueError, match="gate_rce"):
        T.V3Config.from_dict({"gate_rce": "yes"})
    with pytest.raises(ValueError, match="selection"):
        T.V3Config.from_dict({"selection": "median"})
    with pytest.raises(ValueError, match="val_fraction > 0"):
        T.V2Config.from_dict({"selection": "best", "val_fraction": 0.0})
    cfg = T.V3Config.from_dict({"kl_beta": 0, "dropout": None, "min_positive_ratio": 0.2})
    assert cfg.kl_beta == 0.0 and isinstance(cfg.kl_beta, float) and cfg.dropout is None
    assert T.V3Config.from_dict(cfg.to_dict()) == cfg


def test_config_defaults_and_every_knob_documented():
    v2, v3 = T.V2Config(), T.V3Config()
    assert (v2.hidden_size, v2.num_layers, v2.temperature) == (256, 1, 0.1)
    assert (v3.rce_tau_start, v3.rce_tau_end, v3.clip_eps) == (2.0, 0.5, 0.2)
    assert (v3.kl_beta, v3.min_std, v3.adv_clip) == (0.1, 0.1, 5.0)
    assert v3.min_positive_ratio == 0.0 and v3.selection == "last"
    for cls in (T.V2Config, T.V3Config):
        src = inspect.getsource(cls)
        for f in cls.__dataclass_fields__:
            line = next(ln for ln in src.splitlines() if ln.strip().startswith(f"{f}:"))
            assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, (
                f"{cls.__name__}.{f} undocumented"
            )


# ============================================================================ loaders


def test_load_groups_keeps_raw_rewards_and_every_candidate(tmp_path):
    syn = _syn(n_groups=6, n_cands=7)
    _write_files(tmp_path, syn)
    groups = G.load_groups(tmp_path / "scored.jsonl", tmp_path / "rewards.jsonl")
    assert len(groups) == 6
    for g, want in zip(groups, syn.groups):
        # defect 7: no top-k filtering; defect 3: rewards exactly as in the rewards file, not z-scored
        assert len(g.seqs) == 7 and g.seqs == want.seqs and g.pool == want.pool
        assert g.rewards == pytest.approx(want.rewards) and g.hard == want.hard
        assert g.sources[0] == "beam"
    cand_groups = G.load_candidate_groups(tmp_path / "cands.jsonl")
    assert cand_groups[0].hard is None and cand_groups[0].rewards == cand_groups[0].info


def test_loaders_reject_inconsistent_files(tmp_path):
    syn = _syn(n_groups=3)
    _write_files(tmp_path, syn)
    import json

    lines = (tmp_path / "scored.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["candidates"][0]["icd_pos"] = [
        (p + 1) % len(rec["pool"]) for p in rec["candidates"][0]["icd_pos"]
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(rec)] + lines[2:]) + "\n")
    # defect 8: labels are pool positions; a position that does not point at the candidate's id is an error
    with pytest.raises(ValueError, match="do not point at icd_ids"):
        G.load_groups(tmp_path / "bad.jsonl", tmp_path / "rewards.jsonl")
    rlines = (tmp_path / "rewards.jsonl").read_text().splitlines()
    # a complete rewards file that lacks anchors
    write_jsonl(tmp_path / "short.jsonl", "icdrl.rewards", [json.loads(rlines[1])])
    with pytest.raises(ValueError, match="no rewards for anchor"):
        G.load_groups(tmp_path / "scored.jsonl", tmp_path / "short.jsonl")
    # the same file cut at a line boundary is refused as incomplete, naming the file
    (tmp_path / "cut.jsonl").write_text("\n".join(rlines[:2]) + "\n")
    with pytest.raises(ValueError, match=r"cut.jsonl: incomplete: no end line"):
        G.load_groups(tmp_path / "scored.jsonl", tmp_path / "cut.jsonl")
    with pytest.raises(KeyError, match="no embedding"):
        G.pack_groups(syn.groups, EmbeddingTable(ids=syn.table.ids[:5], emb=syn.table.emb[:5]))


def test_sft_uses_whole_pool_and_pool_positions():
    # defect 8: the supervised stage used a 2-item pool and labels "global id mod 2"
    syn = _syn(n_groups=4, n_cands=6, pool_size=10)
    g = syn.groups[0]
    g = G.Group(
        g.query_id,
        g.pool,
        g.seqs,
        g.rewards,
        g.hard,
        g.info,
        ("beam", "beam", "random", "beam", "similar", "random"),
    )
    t = G.sft_group(g, top_beams=2)
    beams = sorted([0, 1, 3], key=lambda i: -g.info[i])[:2]
    assert t.seqs == tuple(g.seqs[i] for i in beams) and t.pool == g.pool
    packed = G.pack_groups([t], syn.table)
    assert int(packed.pool_mask.sum()) == 10
    pool_ids = syn.table.ids[packed.pool_rows[0].numpy()]
    for s in packed.seqs[0].tolist():
        assert [int(pool_ids[p]) for p in s] == [g.pool[p] for p in s]
    assert G.sft_group(G.Group(1, (5, 6), ((0,),), (0.0,), None, (0.0,), ("random",)), 5) is None


def test_sft_loss_and_sequence_logprob_share_one_teacher_forcing_path():
    # the v2 loss, sequence_logprob (RCE/GRPO) and forward(labels=...) read PointerSelector.step_log_probs
    syn = _syn(n_groups=6, n_cands=4, pool_size=10, depth=3)
    packed = G.pack_groups(syn.groups, syn.table)
    b = G.make_batch(packed, torch.arange(len(packed)), syn.table, torch.device("cpu"))
    model = _model().eval()
    lp = model.sequence_logprob(b.query, b.pool, b.seqs, b.pool_mask)
    n_steps = (b.seqs >= 0).sum()
    assert torch.allclose(T.sft_loss(model, b, 0.0), -lp.sum() / n_steps, atol=1e-6)
    labels = b.seqs[:, 0]
    assert torch.equal(model(b.query, b.pool, b.pool_mask, labels=labels)["logp"], lp[:, 0])
    # label smoothing: (1 − ε)·CE + ε·(mean −log p over the items still available), per real step
    eps, want = 0.1, 0.0
    s = model.scores(b.query, b.pool, b.pool_mask)
    for i in range(b.seqs.shape[0]):
        for n in range(b.seqs.shape[1]):
            chosen = []
            for y in b.seqs[i, n].tolist():
                if y < 0:
                    break
                logits = s[i].clone()
                logits[chosen] = float("-inf")
                logp = torch.log_softmax(logits, -1)
                avail = torch.isfinite(logits)
                want += -(1 - eps) * logp[y].item() - eps * logp[avail].mean().item()
                chosen.append(y)
    assert T.sft_loss(model, b, eps).item() == pytest.approx(want / int(n_steps), rel=1e-5)


def test_split_val_is_deterministic_and_disjoint():
    syn = _syn(n_groups=20)
    tr, va = G.split_val(syn.groups, 0.25, 0)
    tr2, va2 = G.split_val(list(reversed(syn.groups)), 0.25, 0)
    assert len(va) == 5 and {g.query_id for g in va} == {g.query_id for g in va2}
    assert not {g.query_id for g in tr} & {g.query_id for g in va}
    assert G.split_val(syn.groups, 0.0, 0)[1] == []


# ============================================================================ training loops


def test_v2_then_v3_files_end_to_end_and_deterministic(tmp_path):
    syn = _syn()
    d = _write_files(tmp_path, syn)
    for run in ("a", "b"):
        T.train_v2_files(
            str(d / "cands.jsonl"),
            str(d / "emb.npz"),
            SMALL_V2,
            3,
            str(d / f"v2{run}.pt"),
            str(d / f"v2{run}.csv"),
        )
        T.train_v3_files(
            str(d / f"v2{run}.pt"),
            str(d / "scored.jsonl"),
            str(d / "rewards.jsonl"),
            str(d / "emb.npz"),
            v3_cfg=SMALL_V3,
            use_rank=True,
            seed=3,
            out_ckpt=str(d / f"v3{run}.pt"),
            out_metrics=str(d / f"v3{run}.csv"),
            cell={"slug": "x"},
        )
    for stage in ("v2", "v3"):
        assert (d / f"{stage}a.csv").read_bytes() == (d / f"{stage}b.csv").read_bytes()
        assert (d / f"{stage}a.pt").read_bytes() == (d / f"{stage}b.pt").read_bytes()
        ca, cb = torch.load(d / f"{stage}a.pt"), torch.load(d / f"{stage}b.pt")
        assert ca["config"] == cb["config"]
        assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
    with open(d / "v3a.csv", newline="") as fh:
        assert next(csv.reader(fh)) == list(T.METRIC_COLUMNS)
    rows = _read_csv(d / "v3a.csv")
    assert [(r["phase"], r["epoch"]) for r in rows] == [("rce", "1"), ("grpo", "1"), ("grpo", "2")]
    assert rows[0]["ratio_mean"] == "" and rows[1]["ratio_mean"] != ""
    assert [r["phase"] for r in _read_csv(d / "v2a.csv")] == ["v2", "v2"]
    m = PointerSelector.load(d / "v3a.pt")
    assert m.checkpoint_config["use_rank"] is True and m.checkpoint_config["phase"] == "v3"
    assert (
        m.checkpoint_config["cell"] == {"slug": "x"}
        and m.checkpoint_config["label_order"] == "prompt"
    )
    assert (
        m.checkpoint_config["selected_phase"] == "grpo"
        and m.checkpoint_config["selected_epoch"] == 2
    )
    # a different seed gives a different model
    T.train_v2_files(
        str(d / "cands.jsonl"),
        str(d / "emb.npz"),
        SMALL_V2,
        4,
        str(d / "v2c.pt"),
        str(d / "v2c.csv"),
    )
    sa, sc = torch.load(d / "v2a.pt")["state_dict"], torch.load(d / "v2c.pt")["state_dict"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_v2_learns_the_beams():
    syn = _syn(n_groups=48, n_cands=4, pool_size=12, dim=16)
    cfg = T.V2Config(
        hidden_size=32,
        epochs=15,
        batch_queries=8,
        lr=3e-3,
        val_fraction=0.0,
        top_beams=1,
        label_smoothing=0.0,
    )
    model, rows, meta = T.train_v2(syn.groups, syn.table, cfg, seed=0)
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    # greedy now reproduces most training anchors' top beam (the planted best sequence)
    hits = 0
    for g in syn.groups:
        q = syn.table.tensor[syn.table.row(g.query_id)]
        pool = syn.table.tensor[syn.table.rows(g.pool, "pool")]
        hits += tuple(model.select(q, pool, 2).tolist()) == g.seqs[0]
    assert hits / len(syn.groups) > 0.5
    assert meta["selected_epoch"] == 15


def test_grpo_ratio_exactly_one_at_identical_weights_with_dropout():
    # defect 5: old log-probs without dropout, new ones with dropout 0.5 → ratios far from 1
    syn = _syn()
    model = _model(dropout=0.5)
    seen = []
    cfg = T.V3Config(rce_epochs=0, grpo_epochs=3, grpo_lr=0.0, batch_queries=8, val_fraction=0.0)
    _, rows, _ = T.train_v3(
        model,
        syn.groups,
        syn.table,
        cfg,
        use_rank=False,
        seed=0,
        on_step=lambda ph, ep, st, d: seen.append(d),
    )
    assert len(seen) == 9
    assert all(
        d["ratio_mean"] == 1.0 and d["ratio_max"] == 1.0 and d["clip_frac"] == 0.0 for d in seen
    )
    assert all(r["ratio_mean"] == 1.0 and r["ratio_max"] == 1.0 and r["kl"] == 0.0 for r in rows)


def test_pi_old_refreshed_each_epoch_and_pi_ref_is_grpo_start():
    # defect 6: π_old was a pre-RCE snapshot never refreshed; the KL measured RCE drift
    syn = _syn()
    model = _model(dropout=0.3)
    first = {}
    cfg = T.V3Config(
        rce_epochs=2, rce_lr=1e-2, grpo_epochs=3, grpo_lr=1e-2, batch_queries=8, val_fraction=0.0
    )

    def hook(phase, epoch, step, d):
        if phase == "grpo" and step == 0:
            first[epoch] = d

    T.train_v3(model, syn.groups, syn.table, cfg, use_rank=False, seed=0, on_step=hook)
    for d in first.values():
        assert (
            d["ratio_mean"] == 1.0 and d["ratio_max"] == 1.0
        )  # π_old = current policy at epoch start
    assert first[1]["kl"] == 0.0  # π_ref = policy after RCE (RCE did move it: lr 1e-2)
    assert first[2]["kl"] > 0 and first[3]["kl"] > 0  # π_ref is not refreshed


def test_rce_moves_weights_and_tau_schedule():
    assert T._tau(0, 10, 2.0, 0.5) == 2.0 and T._tau(9, 10, 2.0, 0.5) == 0.5
    assert T._tau(0, 1, 2.0, 0.5) == 2.0
    syn = _syn()
    taus = []
    cfg = T.V3Config(rce_epochs=2, grpo_epochs=0, batch_queries=8, val_fraction=0.0)
    T.train_v3(
        _model(),
        syn.groups,
        syn.table,
        cfg,
        use_rank=True,
        seed=0,
        on_step=lambda ph, ep, st, d: taus.append(d["tau"]),
    )
    assert taus[0] == 2.0 and taus[-1] == 0.5 and all(a > b for a, b in zip(taus, taus[1:]))


def test_conditional_training_and_flat_groups_are_counted(tmp_path):
    # defect 11: the positive-ratio gate (seed plan 4) was never implemented; defect 7: flat groups
    syn = _syn(n_groups=24, n_cands=5)
    groups = list(syn.groups)
    for i in (0, 1, 2):  # make three groups flat (all rewards 0, no positive)
        g = groups[i]
        groups[i] = G.Group(g.query_id, g.pool, g.seqs, (0.0,) * 5, (0.0,) * 5, g.info, g.sources)
    pos = [sum(h >= 0.5 for h in g.hard) / len(g.hard) for g in groups]
    flat = [len(set(g.rewards)) == 1 for g in groups]
    n_low = sum(p < 0.2 for p in pos)
    n_skip = sum(p < 0.2 or f for p, f in zip(pos, flat))
    assert 0 < n_low < len(groups)
    base = dict(rce_epochs=1, grpo_epochs=1, batch_queries=8, val_fraction=0.0)
    _, rows, _ = T.train_v3(
        _model(),
        groups,
        syn.table,
        T.V3Config(**base, min_positive_ratio=0.2),
        use_rank=True,
        seed=0,
    )
    rce, grpo = rows
    assert rce["groups_skipped"] == 0 and rce["groups_kept"] == 24
    assert grpo["groups_skipped"] == n_skip and grpo["groups_kept"] == 24 - n_skip
    _, rows, _ = T.train_v3(
        _model(),
        groups,
        syn.table,
        T.V3Config(**base, min_positive_ratio=0.2, gate_rce=True),
        use_rank=True,
        seed=0,
    )
    assert rows[0]["groups_skipped"] == n_low
    _, rows, _ = T.train_v3(_model(), groups, syn.table, T.V3Config(**base), use_rank=True, seed=0)
    assert rows[1]["groups_skipped"] == sum(
        flat
    )  # flat groups never train GRPO, even with rank advantages


def test_val_proxy_scores_the_greedy_sequence():
    syn = _syn(n_groups=4, n_cands=3)
    model = _model().eval()
    groups = []
    for i, g in enumerate(syn.groups):
        q = syn.table.tensor[syn.table.row(g.query_id)]
        pool = syn.table.tensor[syn.table.rows(g.pool, "pool")]
        greedy = tuple(model.select(q, pool, 2).tolist())
        others = [s for s in g.seqs if s != greedy][:2]
        seqs = (
            (others[0], greedy, others[1])
            if i < 3
            else (others[0], others[1], tuple(reversed(greedy)))
        )
        groups.append(
            G.Group(
                g.query_id, g.pool, seqs, (1.0, 7.0 + i, 2.0), g.hard[:3], g.info[:3], g.sources[:3]
            )
        )
    packed = G.pack_groups(groups, syn.table)
    val, cov = T.val_proxy(model, packed, syn.table, torch.device("cpu"))
    assert (
        val == pytest.approx((7 + 8 + 9) / 3) and cov == 0.75
    )  # the reversed sequence does not match
    assert T.val_proxy(model, None, syn.table, torch.device("cpu")) == (None, 0.0)


def test_selection_best_keeps_the_best_validation_epoch(tmp_path):
    syn = _syn(n_groups=40, n_cands=6, pool_size=8)
    cfg = T.V3Config(
        rce_epochs=1,
        grpo_epochs=4,
        batch_queries=4,
        grpo_lr=3e-3,
        val_fraction=0.5,
        selection="best",
        save_epochs=True,
    )
    out = tmp_path / "v3.pt"
    model, rows, meta = T.train_v3(
        _model(), syn.groups, syn.table, cfg, use_rank=False, seed=0, out_ckpt=str(out)
    )
    grpo = [r for r in rows if r["phase"] == "grpo"]
    vals = [(r["val_reward"], -r["epoch"]) for r in grpo if r["val_reward"] is not None]
    want = -max(vals)[1] if vals else grpo[-1]["epoch"]
    assert meta["selected_phase"] == "grpo" and meta["selected_epoch"] == want
    # the per-epoch checkpoint of that epoch holds the returned weights
    ep = PointerSelector.load(tmp_path / f"v3.grpo_epoch{want:03d}.pt")
    sd = model.state_dict()
    assert all(torch.equal(ep.state_dict()[k], sd[k]) for k in sd)
    assert (tmp_path / "v3.rce_epoch001.pt").exists()


def test_planted_preference_raises_greedy_reward():
    syn = _syn(n_groups=64, n_cands=8, pool_size=16, dim=16, seed=5)

    def greedy_reward(model):
        out = []
        for g in syn.groups:
            q = syn.table.tensor[syn.table.row(g.query_id)]
            pool = syn.table.tensor[syn.table.rows(g.pool, "pool")]
            out.append(syn.planted_reward(g, model.select(q, pool, 2).tolist()))
        return float(np.mean(out))

    # RCE then GRPO with z-score advantages, and GRPO alone with rank advantages
    for use_rank, rce_epochs in ((False, 2), (True, 0)):
        model = _model(dim=16, hidden=32)
        before = greedy_reward(model)
        cfg = T.V3Config(
            rce_epochs=rce_epochs,
            grpo_epochs=6,
            batch_queries=8,
            rce_lr=1e-3,
            grpo_lr=1e-3,
            val_fraction=0.0,
        )
        trained, _, _ = T.train_v3(model, syn.groups, syn.table, cfg, use_rank=use_rank, seed=0)
        after = greedy_reward(trained)
        best = float(np.mean([g.info[0] for g in syn.groups]))  # the planted optimum
        assert after > before + 0.25 * (best - before), (use_rank, before, after, best)


def test_cuda_request_without_cuda_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    syn = _syn(n_groups=4)
    with pytest.raises(ValueError, match="CUDA is not available"):
        T.train_v3(
            _model(), syn.groups, syn.table, T.V3Config(device="cuda"), use_rank=False, seed=0
        )


# ============================================================================ property: training stays finite


@st.composite
def _adversarial_groups(draw):
    syn = _syn(n_groups=10, n_cands=3, pool_size=24, dim=8, seed=draw(st.integers(0, 3)))
    groups = []
    for g in syn.groups:
        n = draw(st.integers(1, 20))
        rng = np.random.RandomState(draw(st.integers(0, 2**16)))
        seqs = tuple(tuple(int(p) for p in rng.choice(24, size=2, replace=False)) for _ in range(n))
        kind = draw(st.sampled_from(["random", "ties", "equal", "zero", "huge", "tiny"]))
        if kind == "random":
            r = rng.randn(n) * 10 ** rng.uniform(-3, 3)
        elif kind == "ties":
            r = rng.choice([0.0, 1.0, 3.0], size=n)
        elif kind == "equal":
            r = np.full(n, rng.randn())
        elif kind == "zero":
            r = np.zeros(n)
        elif kind == "huge":
            r = rng.randn(n) * 1e30
        else:
            r = rng.randn(n) * 1e-30
        hard = tuple(float(x) for x in rng.randint(0, 2, size=n))
        groups.append(
            G.Group(
                g.query_id,
                g.pool,
                seqs,
                tuple(float(x) for x in r),
                hard,
                (0.0,) * n,
                ("random",) * n,
            )
        )
    return syn.table, groups


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_adversarial_groups(), st.booleans(), st.sampled_from([0.0, 0.2]))
def test_property_training_keeps_parameters_finite(data, use_rank, mpr):
    table, groups = data
    model = _model(dim=8, hidden=16, dropout=0.2)
    cfg = T.V3Config(
        rce_epochs=1,
        grpo_epochs=2,
        batch_queries=4,
        rce_lr=1e-2,
        grpo_lr=1e-2,
        val_fraction=0.2,
        min_positive_ratio=mpr,
        gate_rce=True,
    )
    trained, rows, _ = T.train_v3(model, groups, table, cfg, use_rank=use_rank, seed=0)
    assert len(rows) == 3
    for p in trained.parameters():
        assert torch.isfinite(p).all()
    for r in rows:
        for k, v in r.items():
            assert not (isinstance(v, float) and not math.isfinite(v)), (k, v)


def test_keeper_selection_rules():
    m = _model()
    k = T._Keeper("best")
    for epoch, val in enumerate([None, None, 0.5, 0.7, None, 0.7, 0.2], start=1):
        k.offer(m, "grpo", epoch, val)
    assert k.tag == ("grpo", 4) and k.best == 0.7  # ties go to the earlier epoch; None never wins
    k = T._Keeper("best")
    for epoch in (1, 2, 3):
        k.offer(m, "grpo", epoch, None)
    assert k.tag == ("grpo", 3)  # no proxy at all: the last epoch
    k = T._Keeper("last")
    for epoch, val in ((1, 0.9), (2, 0.1)):
        k.offer(m, "grpo", epoch, val)
    assert k.tag == ("grpo", 2)


def test_label_order_selection_teaches_the_beam_order_and_needs_a_matching_v2(tmp_path):
    from icdrl.selector import label_sequence, prompt_sequence

    # insert first: the prompt (a, b) was built b then a; selection order is (b, a)
    assert label_sequence((3, 7), "selection", "first") == (7, 3)
    assert label_sequence((3, 7), "selection", "last") == (3, 7)
    assert label_sequence((3, 7), "prompt", "first") == (3, 7)
    # the picks p1, p2, p3 of a selection-order selector go into the prompt by the insert rule
    assert prompt_sequence([1, 2, 3], "selection", "first") == [3, 2, 1]
    assert prompt_sequence([1, 2, 3], "selection", "last") == [1, 2, 3]
    assert prompt_sequence([1, 2, 3], "prompt", "first") == [1, 2, 3]
    syn = _syn()
    flipped = G.in_label_order(syn.groups, "selection", "first")
    assert [s[::-1] for s in flipped[0].seqs] == list(syn.groups[0].seqs)
    assert G.in_label_order(syn.groups, "prompt", "first") == list(syn.groups)
    d = _write_files(tmp_path, syn)
    sel_v2 = {**SMALL_V2, "label_order": "selection"}
    T.train_v2_files(
        str(d / "cands.jsonl"), str(d / "emb.npz"), sel_v2, 3, str(d / "v2s.pt"), str(d / "v2s.csv")
    )
    T.train_v2_files(
        str(d / "cands.jsonl"),
        str(d / "emb.npz"),
        SMALL_V2,
        3,
        str(d / "v2p.pt"),
        str(d / "v2p.csv"),
    )
    assert PointerSelector.load(d / "v2s.pt").checkpoint_config["label_order"] == "selection"
    # the two orders teach different targets, so the selectors differ
    sa, sb = torch.load(d / "v2s.pt")["state_dict"], torch.load(d / "v2p.pt")["state_dict"]
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)
    kw = dict(use_rank=False, seed=3, out_ckpt=str(d / "v3.pt"), out_metrics=str(d / "v3.csv"))
    with pytest.raises(ValueError, match="label_order=prompt.*needs label_order=selection"):
        T.train_v3_files(
            str(d / "v2p.pt"),
            str(d / "scored.jsonl"),
            str(d / "rewards.jsonl"),
            str(d / "emb.npz"),
            v3_cfg={**SMALL_V3, "label_order": "selection"},
            **kw,
        )
    T.train_v3_files(
        str(d / "v2s.pt"),
        str(d / "scored.jsonl"),
        str(d / "rewards.jsonl"),
        str(d / "emb.npz"),
        v3_cfg={**SMALL_V3, "label_order": "selection"},
        **kw,
    )
    assert PointerSelector.load(d / "v3.pt").checkpoint_config["label_order"] == "selection"

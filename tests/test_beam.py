"""InfoScore beam search and stage-3 shards (docs/science.md §4) against a deterministic fake backend."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from stage_fakes import FakeBackend, make_examples, patch_dataset, random_table, save_table

from icdrl import beam
from icdrl.beam import AnchorScorer, BeamConfig, beam_search, build_steps, generate_shard
from icdrl.records import (
    CandidateRecord,
    PoolRecord,
    concat_jsonl,
    read_jsonl,
    read_records,
    write_records,
)

TRAIN = make_examples(40)


def brute_force(query, pool, depth, insert):
    """Every ordered sequence of ``depth`` pool items, scored from scratch, best first."""
    fb = FakeBackend()
    p0 = fb.answer_logprobs([([], query)], [query.answer])[0].prob
    rows = []
    for seq in itertools.permutations(range(len(pool)), depth):
        steps = build_steps(seq, insert)
        ps = [
            fb.answer_logprobs([([pool[i] for i in s], query)], [query.answer])[0].prob
            for s in steps
        ]
        gains = tuple(np.diff([p0, *ps]))
        rows.append((seq, ps[-1] - p0, gains))
    rows.sort(key=lambda r: (-r[1], r[0]))
    return rows


@pytest.mark.parametrize("insert", ["first", "last"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_wide_beam_equals_brute_force(insert, depth):
    query, pool = TRAIN[0], TRAIN[1:6]
    n_all = len(list(itertools.permutations(range(5), depth)))
    beams = beam_search(
        AnchorScorer(FakeBackend(), query, pool), beam_width=n_all, depth=depth, insert=insert
    )
    ref = brute_force(query, pool, depth, insert)
    assert [b.pos for b in beams] == [r[0] for r in ref]
    np.testing.assert_allclose(
        [b.info_score for b in beams], [r[1] for r in ref], rtol=0, atol=1e-12
    )
    for b, r in zip(beams, ref):
        np.testing.assert_allclose(b.step_gains, r[2], rtol=0, atol=1e-12)


def test_narrow_beam_is_sorted_and_not_brute_force_everywhere():
    query, pool = TRAIN[3], TRAIN[10:22]
    beams = beam_search(
        AnchorScorer(FakeBackend(), query, pool), beam_width=3, depth=3, insert="first"
    )
    scores = [b.info_score for b in beams]
    assert len(beams) == 3 and scores == sorted(scores, reverse=True)
    assert len({b.pos for b in beams}) == 3
    for b in beams:
        assert len(set(b.pos)) == 3
        assert sum(b.step_gains) == pytest.approx(b.info_score, abs=1e-12)


def test_width_one_is_greedy_with_insert_side():
    query, pool = TRAIN[5], TRAIN[20:28]
    fb = FakeBackend()

    def p(seq):
        return fb.answer_logprobs([([pool[i] for i in seq], query)], [query.answer])[0].prob

    for insert in ("first", "last"):
        seq: tuple = ()
        for _ in range(3):
            options = [beam.extend(seq, c, insert) for c in range(len(pool)) if c not in seq]
            seq = max(options, key=lambda s: (p(s), tuple(-x for x in s)))
        got = beam_search(
            AnchorScorer(FakeBackend(), query, pool), beam_width=1, depth=3, insert=insert
        )
        assert got[0].pos == seq
    # insert=first puts the newest item at the front (farthest from the query)
    assert beam.extend((1, 2), 7, "first") == (7, 1, 2) and beam.extend((1, 2), 7, "last") == (
        1,
        2,
        7,
    )
    assert build_steps((7, 1, 2), "first") == [(2,), (1, 2), (7, 1, 2)]


def test_each_step_is_one_batched_call_and_no_prompt_twice():
    query, pool = TRAIN[0], TRAIN[1:17]
    fb = FakeBackend()
    seen = []
    orig = fb.answer_logprobs

    def spy(prompts, answers):
        seen.extend((tuple(d.id for d in ds), q.id) for ds, q in prompts)
        return orig(prompts, answers)

    fb.answer_logprobs = spy
    cfg = BeamConfig(beam_width=4, depth=3, n_random=3, n_similar=2)
    sim = list(range(16))
    rec, n = beam.anchor_candidates(fb, query, pool, [ex.id for ex in pool], cfg, sim)
    # one call per beam step (the zero-shot prompt joins the first), at most one for the extras
    assert cfg.depth <= fb.calls <= cfg.depth + 1
    assert len(seen) == len(set(seen)) == n
    assert sum(1 for ds, _ in seen if ds == ()) == 1  # zero-shot once
    assert n >= 1 + 16 + 4 * 15 + 4 * 14


def test_anchor_candidates_record():
    query, pool = TRAIN[0], TRAIN[1:13]
    pool_ids = [ex.id for ex in pool]
    cfg = BeamConfig(beam_width=3, depth=2, n_random=4, n_similar=3, seed=7)
    table = random_table([ex.id for ex in TRAIN])
    sim = beam.similarity_order(table.vector(query.id), table.vectors(pool_ids))
    rec, _ = beam.anchor_candidates(FakeBackend(), query, pool, pool_ids, cfg, sim)
    srcs = [c.source for c in rec.candidates]
    assert srcs == ["beam"] * 3 + ["random"] * 4 + ["similar"] * 3
    seqs = [c.icd_pos for c in rec.candidates]
    assert len(set(seqs)) == len(seqs)  # extras never repeat a beam or each other
    for c in rec.candidates:
        assert len(c.icd_pos) == 2 and list(c.icd_ids) == [pool_ids[p] for p in c.icd_pos]
        assert sum(c.step_gains) == pytest.approx(c.info_score, abs=1e-12)
    # similar sequences use the most similar items, the most similar nearest the query (last)
    sims = [c for c in rec.candidates if c.source == "similar"]
    assert sims[0].icd_pos == (sim[1], sim[0])
    assert all(sim.index(c.icd_pos[-1]) < sim.index(c.icd_pos[0]) for c in sims)
    assert rec.zero_shot_prob == pytest.approx(np.exp(rec.zero_shot_logprob))
    # random extras are seeded per anchor
    again, _ = beam.anchor_candidates(FakeBackend(), query, pool, pool_ids, cfg, sim)
    assert again == rec
    cfg8 = BeamConfig(beam_width=3, depth=2, n_random=4, n_similar=3, seed=8)
    other, _ = beam.anchor_candidates(FakeBackend(), query, pool, pool_ids, cfg8, sim)
    assert [c.icd_pos for c in other.candidates if c.source == "random"] != [
        c.icd_pos for c in rec.candidates if c.source == "random"
    ]


def test_random_sequences_small_space_exhausts_without_repeats():
    rng = np.random.default_rng(0)
    excl = {(0, 1), (1, 0)}
    out = beam.random_sequences(3, 2, 10, rng, excl)
    assert sorted(out) == sorted(set(itertools.permutations(range(3), 2)) - excl)


def test_config_errors():
    with pytest.raises(ValueError, match="insert"):
        BeamConfig(insert="middle")
    with pytest.raises(ValueError, match="unknown keys"):
        BeamConfig.from_dict({"beam_width": 2, "widht": 3})
    assert BeamConfig.from_dict({"beam_width": 2, "shards": 4}).beam_width == 2
    with pytest.raises(ValueError, match="exceeds the pool size"):
        beam_search(AnchorScorer(FakeBackend(), TRAIN[0], TRAIN[1:3]), beam_width=2, depth=3)
    with pytest.raises(ValueError, match="shard 3"):
        beam.shard_indices(10, 3, 3)


# --------------------------------------------------------------------------- shards and resume


@pytest.fixture
def shard_setup(tmp_path, monkeypatch):
    patch_dataset(monkeypatch, {"train": TRAIN})
    rng = np.random.default_rng(0)
    anchors = [0, 3, 5, 8, 11, 13]
    pools = []
    for a in anchors:
        others = [i for i in range(len(TRAIN)) if i != a]
        pools.append(
            PoolRecord(query_id=a, pool=tuple(int(x) for x in rng.choice(others, 8, replace=False)))
        )
    pools_path = tmp_path / "pools.jsonl"
    write_records(pools_path, pools)
    emb_path = tmp_path / "train.npz"
    save_table(random_table([ex.id for ex in TRAIN]), emb_path)
    cfg = {
        "beam_width": 2,
        "depth": 2,
        "insert": "first",
        "n_random": 2,
        "n_similar": 2,
        "seed": 0,
        "shards": 2,
    }
    return pools_path, emb_path, cfg, anchors


def _run(setup, out, shard=0, n_shards=1, backend=None):
    pools_path, emb_path, cfg, _ = setup
    generate_shard(
        {},
        {"name": "fake"},
        None,
        str(pools_path),
        str(emb_path),
        cfg,
        shard,
        n_shards,
        str(out),
        backend=backend or FakeBackend(),
    )


def test_shards_partition_anchors_and_concat(shard_setup, tmp_path):
    anchors = shard_setup[3]
    _run(shard_setup, tmp_path / "all.jsonl")
    for s in range(3):
        _run(shard_setup, tmp_path / f"s{s}.jsonl", s, 3)
    concat_jsonl(
        [tmp_path / f"s{s}.jsonl" for s in range(3)], "icdrl.candidates", tmp_path / "cat.jsonl"
    )
    whole = {r.anchor_id: r for r in read_records(tmp_path / "all.jsonl", CandidateRecord)}
    cat = read_records(tmp_path / "cat.jsonl", CandidateRecord)
    assert sorted(r.anchor_id for r in cat) == sorted(anchors)
    assert all(whole[r.anchor_id] == r for r in cat)
    assert [r.anchor_id for r in read_records(tmp_path / "s1.jsonl", CandidateRecord)] == anchors[
        1::3
    ]
    first = read_jsonl(tmp_path / "all.jsonl", "icdrl.candidates")[0]
    assert set(first) == {"anchor_id", "pool", "zero_shot_logprob", "zero_shot_prob", "candidates"}
    assert set(first["candidates"][0]) == {
        "source",
        "icd_ids",
        "icd_pos",
        "info_score",
        "step_gains",
    }
    with open(tmp_path / "all.jsonl") as fh:
        assert json.loads(fh.readline()) == {"schema": "icdrl.candidates", "version": 1}


def test_killed_shard_resumes_with_only_unfinished_anchors(shard_setup, tmp_path):
    anchors = shard_setup[3]
    ref = tmp_path / "ref.jsonl"
    _run(shard_setup, ref)
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        _run(shard_setup, out, backend=FakeBackend(fail_at_query=anchors[3]))
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert [d["anchor_id"] for d in read_partial(partial)] == anchors[:3]
    fb = FakeBackend()
    _run(shard_setup, out, backend=fb)
    assert set(fb.per_query) == set(anchors[3:])  # finished anchors are not recomputed
    assert not partial.exists()
    assert read_records(out, CandidateRecord) == read_records(ref, CandidateRecord)
    # a finished output is not touched again by resuming logic: a rerun computes everything afresh
    fb2 = FakeBackend()
    _run(shard_setup, out, backend=fb2)
    assert set(fb2.per_query) == set(anchors)


def test_torn_partial_line_and_other_settings_are_recomputed(shard_setup, tmp_path):
    anchors = shard_setup[3]
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        _run(shard_setup, out, backend=FakeBackend(fail_at_query=anchors[2]))
    partial = out.with_name(out.name + ".partial")
    text = partial.read_text()
    partial.write_text(text + text.splitlines()[-1][:30])  # a torn record from a kill mid-write
    fb = FakeBackend()
    _run(shard_setup, out, backend=fb)
    assert set(fb.per_query) == set(anchors[2:])
    # a partial written with other settings is discarded
    with pytest.raises(RuntimeError):
        _run(shard_setup, out, backend=FakeBackend(fail_at_query=anchors[1]))
    pools_path, emb_path, cfg, _ = shard_setup
    fb = FakeBackend()
    generate_shard(
        {},
        {"name": "fake"},
        None,
        str(pools_path),
        str(emb_path),
        {**cfg, "beam_width": 3},
        0,
        1,
        str(out),
        backend=fb,
    )
    assert set(fb.per_query) == set(anchors)


def read_partial(path):
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["partial"] is True
    return [json.loads(x) for x in lines[1:]]

# Stage 4: InfoScore beam search (+ random and similar extras), scattered over anchor shards
# (candidates_shard), then concatenated in shard order (concat_candidates).


rule candidates_shard:
    input:
        model=MODEL_INPUT,
        pools=L.pools_anchors,
        train_emb=L.emb.format(split="train"),
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/shards/candidates-{shard}-of-<shards>.jsonl
    output:
        L.candidates_shard,
    log:
        logfile(L.candidates_shard),
    benchmark:
        benchfile(L.candidates_shard)
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        n_shards=L.n_shards,
        dataset=section("dataset"),
        model=section("model"),
        candidates=section("candidates"),
    script:
        "../scripts/candidates_shard.py"


rule concat_candidates:
    input:
        L.shards(L.candidates_shard),
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/candidates.jsonl
    output:
        L.candidates,
    log:
        logfile(L.candidates),
    localrule: True
    conda:
        "../envs/icdrl.yaml"
    params:
        schema="icdrl.candidates",
    script:
        "../scripts/concat_jsonl.py"

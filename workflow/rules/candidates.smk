# Stage 1: InfoScore beam search (+ random and similar extras), scattered over anchor shards.


rule candidates_shard:
    input:
        model=MODEL_INPUT,
        pools=L.pools_anchors,
        train_emb=L.emb.format(split="train"),
    output:
        L.candidates_shard,
    params:
        n_shards=L.n_shards,
        dataset=section("dataset"),
        model=section("model"),
        candidates=section("candidates"),
    log:
        logfile(L.candidates_shard),
    benchmark:
        benchfile(L.candidates_shard)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/candidates.py"


rule gather_candidates:
    input:
        L.shards(L.candidates_shard),
    output:
        L.candidates,
    params:
        schema="icdrl.candidates",
    log:
        logfile(L.candidates),
    localrule: True
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/gather.py"

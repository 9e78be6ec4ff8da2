# Stage 5: the LVLM answers with every candidate sequence; VQA accuracy and correctness
# (score_shard per anchor shard, then concat_scored).


rule score_shard:
    input:
        model=MODEL_INPUT,
        candidates=L.candidates_shard,
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/<scored>/shards/scored-{shard}-of-<shards>.jsonl
    output:
        L.scored_shard,
    log:
        logfile(L.scored_shard),
    benchmark:
        benchfile(L.scored_shard)
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        dataset=section("dataset"),
        model=section("model"),
        scoring=section("scoring"),
    script:
        "../scripts/score_shard.py"


rule concat_scored:
    input:
        L.shards(L.scored_shard),
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/<scored>/scored.jsonl
    output:
        L.scored,
    log:
        logfile(L.scored),
    localrule: True
    conda:
        "../envs/icdrl.yaml"
    params:
        schema="icdrl.scored",
    script:
        "../scripts/concat_jsonl.py"

# Stage 2: the LVLM answers with every candidate sequence; VQA accuracy and correctness.


rule score_shard:
    input:
        model=MODEL_INPUT,
        candidates=L.candidates_shard,
    output:
        L.scored_shard,
    params:
        dataset=section("dataset"),
        model=section("model"),
        scoring=section("scoring"),
    log:
        logfile(L.scored_shard),
    benchmark:
        benchfile(L.scored_shard)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/score.py"


rule gather_scored:
    input:
        L.shards(L.scored_shard),
    output:
        L.scored,
    params:
        schema="icdrl.scored",
    log:
        logfile(L.scored),
    localrule: True
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/gather.py"

# Stage 3: per-query candidate pools (K train ids) for the training anchors, the test and the validation queries.


rule pools:
    input:
        query=lambda w: L.emb.format(split="train" if w.role == "anchors" else "eval"),
        train=L.emb.format(split="train"),
    # results/<dataset>/pools/<encoder>/<pools>/{role}-n{n}.jsonl
    output:
        L.pools,
    log:
        logfile(L.pools),
    benchmark:
        benchfile(L.pools)
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    params:
        dataset=section("dataset"),
        pools=section("pools"),
    script:
        "../scripts/pools.py"

# Stage 5: every method on the test queries at shots 1-4 (per-query records).

EVAL_INPUT = dict(
    model=MODEL_INPUT,
    test_pools=L.pools_test,
    eval_emb=L.emb.format(split="eval"),
    train_emb=L.emb.format(split="train"),
)


rule evaluate_baseline:
    input:
        **EVAL_INPUT,
    output:
        L.eval_baseline,
    log:
        logfile(L.eval_baseline),
    benchmark:
        benchfile(L.eval_baseline)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_v2:
    input:
        **EVAL_INPUT,
        selector=L.v2_ckpt,
    output:
        L.eval_v2,
    log:
        logfile(L.eval_v2),
    benchmark:
        benchfile(L.eval_v2)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_v3:
    input:
        **EVAL_INPUT,
        selector=L.v3_ckpt,
    output:
        L.eval_v3,
    log:
        logfile(L.eval_v3),
    benchmark:
        benchfile(L.eval_v3)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/evaluate.py"

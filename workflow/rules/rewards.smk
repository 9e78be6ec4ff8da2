# Stage 6: one rewards file per reward setting ({reward} = mode + the knobs that mode reads).


rule rewards:
    input:
        scored=L.scored,
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/<scored>/rewards/{reward}.jsonl
    output:
        L.rewards,
    log:
        logfile(L.rewards),
    localrule: True
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/rewards.py"

# Stage 3: one rewards file per reward setting ({reward} = mode + the knobs that mode reads).


rule rewards:
    input:
        scored=L.scored,
    output:
        L.rewards,
    log:
        logfile(L.rewards),
    localrule: True
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/rewards.py"

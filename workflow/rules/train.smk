# Stage 4: the pointer selector. v2 (supervised on InfoScore beams) per seed; v3 (v2 + RCE +
# GRPO) per grid cell ({reward}, {adv}) and seed.


rule train_v2:
    input:
        candidates=L.candidates,
        train_emb=L.emb.format(split="train"),
    output:
        ckpt=L.v2_ckpt,
        metrics=L.v2_metrics,
    log:
        logfile(L.v2_ckpt),
    benchmark:
        benchfile(L.v2_ckpt)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/train_v2.py"


rule train_v3:
    input:
        v2=L.v2_ckpt,
        scored=L.scored,
        rewards=L.rewards,
        train_emb=L.emb.format(split="train"),
    output:
        ckpt=L.v3_ckpt,
        metrics=L.v3_metrics,
    log:
        logfile(L.v3_ckpt),
    benchmark:
        benchfile(L.v3_ckpt)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/train_v3.py"

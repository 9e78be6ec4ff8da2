# Stage 7: the pointer selector. v2 (supervised on InfoScore beams) per {v2} setting and seed;
# v3 (v2 + RCE + GRPO) per grid cell ({v3} training settings, {reward}, {adv}) and seed.


rule train_v2:
    input:
        candidates=L.candidates,
        train_emb=L.emb.format(split="train"),
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/{v2}/seed{seed}/{selector.pt,metrics.csv}
    output:
        ckpt=L.v2_ckpt,
        metrics=L.v2_metrics,
    log:
        logfile(L.v2_ckpt),
    benchmark:
        benchfile(L.v2_ckpt)
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        # the train.v2 settings behind {v2} (label_order may differ from train.v2's: a v3 cell's parent)
        v2_cfg=lambda w: L.v2_config(w.v2),
        insert_side=config["candidates"]["insert"],
    script:
        "../scripts/train_v2.py"


rule train_v3:
    input:
        v2=lambda w: L.v2_ckpt.format(v2=L.trained_cell(w.v3, w.reward, w.adv).v2_tag, seed=w.seed),
        scored=L.scored,
        rewards=L.rewards,
        train_emb=L.emb.format(split="train"),
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/<scored>/{v3}/{reward}/{adv}/seed{seed}/{selector.pt,metrics.csv}
    output:
        ckpt=L.v3_ckpt,
        metrics=L.v3_metrics,
    log:
        logfile(L.v3_ckpt),
    benchmark:
        benchfile(L.v3_ckpt)
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        # the cell (reward, use_rank, training overrides) and its effective train.v3 settings
        cell=lambda w: L.trained_cell(w.v3, w.reward, w.adv).cell.as_dict(),
        v3_cfg=lambda w: L.trained_cell(w.v3, w.reward, w.adv).v3_config,
        insert_side=config["candidates"]["insert"],
    script:
        "../scripts/train_v3.py"

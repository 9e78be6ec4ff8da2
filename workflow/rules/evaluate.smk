# Stage 8: every method at shots 1-4 (per-query records): the baselines, RICES over the whole
# training split and the copy baseline, v2 and every v3 cell on the test queries; every v3 cell
# on the validation queries too (pools.n_val > 0), from which per_shot picks, per shot, the best
# cell; and the ablations (shuffled order, no demonstration images) of evaluation.ablate.
import re

EVAL_INPUT = dict(
    model=MODEL_INPUT,
    pools=L.pools_test,
    eval_emb=L.emb.format(split="eval"),
    train_emb=L.emb.format(split="train"),
)


rule evaluate_baseline:
    # a baseline ({method}: zero_shot, random-r<seed>, similarity); the base of evaluate_v2, evaluate_v3
    input:
        **EVAL_INPUT,
    # results/<dataset>/<model>/<encoder>/<pools>/test-n<n_test>-k<shots>-mnt<max_new_tokens>-<metric>/{method}.jsonl
    output:
        L.eval_baseline,
    log:
        logfile(L.eval_baseline),
    benchmark:
        benchfile(L.eval_baseline)
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        **eval_params("baseline"),
    script:
        "../scripts/evaluate.py"


rule evaluate_rices:
    # the RICES variants (one backend for all of them) and the copy baseline (no LVLM)
    input:
        **EVAL_INPUT,
    # results/<dataset>/<model>/<encoder>/<pools>/test-n<n_test>-k<shots>-mnt<max_new_tokens>-<metric>/{rices_image,rices_text,rices,copy}.jsonl
    output:
        list(L.eval_rices.values()),
    log:
        logfile(L.eval_rices["copy"]),
    benchmark:
        benchfile(L.eval_rices["copy"])
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        **eval_params("rices", methods=list(L.eval_rices)),
    script:
        "../scripts/evaluate.py"


use rule evaluate_baseline as evaluate_v2 with:
    input:
        **EVAL_INPUT,
        selector=L.v2_ckpt,
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/{v2}/seed{seed}/test-n<n_test>-k<shots>-mnt<max_new_tokens>-<metric>.jsonl
    output:
        L.eval_v2,
    log:
        logfile(L.eval_v2),
    benchmark:
        benchfile(L.eval_v2)
    params:
        **eval_params("v2"),


use rule evaluate_baseline as evaluate_v3 with:
    input:
        **EVAL_INPUT,
        val_pools=[L.pools_val] if L.n_val else [],
        selector=L.v3_ckpt,
    # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/<scored>/{v3}/{reward}/{adv}/seed{seed}/{test,val}-n<n_test|n_val>-k<shots>-mnt<max_new_tokens>-<metric>.jsonl
    output:
        # the test queries, and the validation queries in the same job (pools.n_val > 0)
        test=L.eval_v3,
        val=[L.val_v3] if L.val_v3 else [],
    log:
        logfile(L.eval_v3),
    benchmark:
        benchfile(L.eval_v3)
    params:
        **eval_params("v3", cell=lambda w: L.trained_cell(w.v3, w.reward, w.adv).cell.as_dict()),


if L.per_shot:

    rule select_per_shot:
        input:
            val=lambda w: L.v3_evals("val", int(w.seed)),
            test=lambda w: L.v3_evals("test", int(w.seed)),
        # results/<dataset>/<model>/<encoder>/<pools>/anchors-n<n_anchors>/<candidates>/<scored>/per_shot-<hash of the v3 cells>/seed{seed}/test-n<n_test>-k<shots>-mnt<max_new_tokens>-<metric>.jsonl
        output:
            L.per_shot,
        log:
            logfile(L.per_shot),
        localrule: True
        conda:
            "../envs/icdrl.yaml"
        script:
            "../scripts/select_per_shot.py"


if L.ablate:

    rule evaluate_ablation:
        # both ablations of one ablated method's eval file (one backend), beside it
        input:
            model=MODEL_INPUT,
            base="{ablated}.jsonl",
        # {ablated}.shuffled-r<random_seed>.jsonl, {ablated}.no_images.jsonl (beside the ablated eval file)
        output:
            **L.ablation_outputs("{ablated}.jsonl"),
        log:
            "{ablated}.ablations.log",
        benchmark:
            "{ablated}.ablations.benchmark.tsv"
        wildcard_constraints:
            ablated="|".join(re.escape(b[: -len(".jsonl")]) for b in L.ablation_bases()),
        conda:
            "../envs/icdrl.yaml"
        threads: 1
        resources:
            gpu=1,
        params:
            **eval_params("ablations"),
        script:
            "../scripts/evaluate.py"

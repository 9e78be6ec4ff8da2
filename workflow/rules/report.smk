# Stage 9, the final rule: tables, plots and summary for this config's grid (icdrl.report.build_report):
# fixed tables and plots, plus one table, delta plot and summary paragraph per experiment.
# Its folder is keyed by the evaluation files it covers, so a restricted run (REWARD_MODE=...)
# writes its own report and never overwrites the full one.
# Marked files appear in `snakemake --report`, with captions from workflow/report/<name>.rst.


rule answers:
    # the training split's answers, for the report's copy-rate diagnostics (written once per dataset)
    # results/<dataset>/answers/train.json
    output:
        L.answers,
    log:
        logfile(L.answers),
    benchmark:
        benchfile(L.answers)
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    params:
        dataset=section("dataset"),
    script:
        "../scripts/answers.py"


rule report:
    input:
        evals=L.all_eval(),
        answers=L.answers,
        metrics=list(L.labelled_metrics().values()),
        rewards=L.all_rewards(),
        scored=L.scored,
    # results/<dataset>/<model>/report/<hash of the eval files>/summary.md, ... (REPORT_FILES)
    output:
        [report_output(p) for p in REPORT_FILES],
    log:
        f"{L.report_dir}.log",
    benchmark:
        f"{L.report_dir}.benchmark.tsv"
    localrule: True
    conda:
        "../envs/icdrl.yaml"
    params:
        out_dir=lambda w, output: os.path.dirname(output[0]),
        metrics_labels=list(L.labelled_metrics()),
        rewards_labels=[r.slug for r in L.reward_specs()],
        experiments=[e.as_dict() for e in L.experiments()],
        report_cfg=config["report"],
        # the whole config: the report folder keeps a copy (config.yaml)
        config=untracked(config),
    script:
        "../scripts/report.py"

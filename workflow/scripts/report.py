"""The report: tables, plots and summary over every evaluation of this config's grid."""

from _common import run


def main(sm):
    from icdrl.report import build_report

    metrics = dict(zip(sm.params.metrics_labels, map(str, sm.input.metrics), strict=True))
    rewards = dict(zip(sm.params.rewards_labels, map(str, sm.input.rewards), strict=True))
    build_report(
        eval_paths=[str(p) for p in sm.input.evals],
        metrics_paths=metrics,
        rewards_paths=rewards,
        scored_path=str(sm.input.scored),
        report_cfg=dict(sm.params.report_cfg),
        out_dir=str(sm.params.out_dir),
        experiments=list(sm.params.experiments),
        answers=str(sm.input.answers),
        config=dict(sm.params.config),
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

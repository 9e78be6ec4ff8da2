"""The report: tables, plots and summary over every evaluation of this config's grid."""

from _common import run


def main(sm):
    from icdrl.report import build_report

    metrics = dict(zip(sm.params.metrics_labels, map(str, sm.input.metrics), strict=True))
    rewards = dict(zip(sm.params.rewards_labels, map(str, sm.input.rewards), strict=True))
    build_report([str(p) for p in sm.input.evals], metrics, rewards, str(sm.input.scored),
                 dict(sm.params.report_cfg), str(sm.params.out_dir), experiments=list(sm.params.experiments),
                 answers=str(sm.input.answers), config=dict(sm.config))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

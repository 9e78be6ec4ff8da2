"""The training split's answers table (icdrl.answers), read by the report's copy-rate diagnostics."""

from _common import run


def main(sm):
    from icdrl.answers import write_answers

    write_answers(dataset_cfg=sm.params.dataset, out_path=str(sm.output[0]))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

"""VQA scoring of one shard of candidate sequences."""

from _common import model_path, run


def main(sm):
    from icdrl.scoring import score_shard

    c = sm.config
    score_shard(c["dataset"], c["model"], model_path(sm), str(sm.input.candidates), c["scoring"], str(sm.output[0]))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

"""v2 (supervised) selector of one seed."""

from _common import run


def main(sm):
    from icdrl.train import train_v2_files

    train_v2_files(str(sm.input.candidates), str(sm.input.train_emb), sm.config["train"]["v2"],
                   int(sm.wildcards.seed), str(sm.output.ckpt), str(sm.output.metrics))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

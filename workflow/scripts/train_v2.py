"""v2 (supervised) selector of one {v2} setting and seed."""

from _common import run


def main(sm):
    from icdrl.train import train_v2_files

    train_v2_files(str(sm.input.candidates), str(sm.input.train_emb), sm.params.v2_cfg, int(sm.wildcards.seed),
                   str(sm.output.ckpt), str(sm.output.metrics), insert=sm.params.insert_side)


run(snakemake, main)  # noqa: F821 - provided by Snakemake

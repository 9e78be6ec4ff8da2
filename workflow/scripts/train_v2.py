"""v2 (supervised) selector of one {v2} setting and seed."""

from _common import run


def main(sm):
    from icdrl.train import train_v2_files

    train_v2_files(
        candidates_path=str(sm.input.candidates),
        train_emb_path=str(sm.input.train_emb),
        v2_cfg=sm.params.v2_cfg,
        seed=int(sm.wildcards.seed),
        out_ckpt=str(sm.output.ckpt),
        out_metrics=str(sm.output.metrics),
        insert=sm.params.insert_side,
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

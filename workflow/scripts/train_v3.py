"""v3 (v2 + RCE + GRPO) selector of one grid cell (params cell, v3_cfg) and seed."""

from _common import run


def main(sm):
    from icdrl.train import train_v3_files

    cell = dict(sm.params.cell)
    train_v3_files(
        v2_ckpt=str(sm.input.v2),
        scored_path=str(sm.input.scored),
        rewards_path=str(sm.input.rewards),
        train_emb_path=str(sm.input.train_emb),
        v3_cfg=dict(sm.params.v3_cfg),
        use_rank=bool(cell["use_rank"]),
        seed=int(sm.wildcards.seed),
        out_ckpt=str(sm.output.ckpt),
        out_metrics=str(sm.output.metrics),
        insert=sm.params.insert_side,
        cell=cell,
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

"""v3 (v2 + RCE + GRPO) selector of one grid cell (wildcards reward, adv) and seed."""

from _common import run


def main(sm):
    from icdrl.grid import parse_cell
    from icdrl.train import train_v3_files

    cell = parse_cell(sm.wildcards.reward, sm.wildcards.adv)
    train_v3_files(str(sm.input.v2), str(sm.input.scored), str(sm.input.rewards), str(sm.input.train_emb),
                   sm.config["train"]["v3"], cell.use_rank, int(sm.wildcards.seed), str(sm.output.ckpt),
                   str(sm.output.metrics))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

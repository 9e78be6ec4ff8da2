"""Rewards of one setting (wildcard reward = mode + the knobs it reads, e.g. hard_plus_soft-hw2-sw1)."""

from _common import run


def main(sm):
    from icdrl.grid import parse_reward_slug
    from icdrl.rewards import write_rewards

    spec = parse_reward_slug(sm.wildcards.reward)
    write_rewards(
        scored_path=str(sm.input.scored),
        mode=spec.mode,
        knobs=spec.as_dict(),
        out_path=str(sm.output[0]),
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

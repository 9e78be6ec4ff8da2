"""Rewards of one setting (wildcard reward = mode + the knobs it reads, e.g. hard_plus_soft-hw2-sw1)."""

from _common import run


def main(sm):
    from icdrl.grid import parse_reward_slug
    from icdrl.rewards import write_rewards

    spec = parse_reward_slug(sm.wildcards.reward)
    # knobs the mode ignores get the config's values; they do not change the result
    knobs = {"hard_weight": 1.0, "soft_weight": 1.0, **sm.config["rewards"], **spec.knobs()}
    write_rewards(str(sm.input.scored), spec.mode, out_path=str(sm.output[0]), **knobs)


run(snakemake, main)  # noqa: F821 - provided by Snakemake

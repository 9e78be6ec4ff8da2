"""Pools of the training anchors, the test or the validation queries (wildcard role: anchors | test | val)."""

from _common import run


def main(sm):
    from icdrl.pools import N_KEY, write_pools

    role = sm.wildcards.role
    want = sm.config["pools"][N_KEY[role]]
    if int(sm.wildcards.n) != int(want):
        raise ValueError(f"{sm.output[0]}: n={sm.wildcards.n} in the path, but the config asks for {want}")
    write_pools(sm.config["dataset"], role, sm.config["pools"], str(sm.input.query), str(sm.input.train),
                str(sm.output[0]))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

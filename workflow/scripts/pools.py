"""Pools of the training anchors or the test queries (wildcard role: anchors | test)."""

from _common import run


def main(sm):
    from icdrl.pools import write_pools

    role = sm.wildcards.role
    want = sm.config["pools"]["n_anchors" if role == "anchors" else "n_test"]
    if int(sm.wildcards.n) != int(want):
        raise ValueError(f"{sm.output[0]}: n={sm.wildcards.n} in the path, but the config asks for {want}")
    write_pools(sm.config["dataset"], role, sm.config["pools"], str(sm.input.query), str(sm.input.train),
                str(sm.output[0]))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

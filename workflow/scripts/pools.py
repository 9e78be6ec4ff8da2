"""Pools of the training anchors, the test or the validation queries (wildcard role: anchors | test | val)."""

from _common import run


def main(sm):
    from icdrl.pools import N_KEY, write_pools

    role, p = sm.wildcards.role, sm.params
    want = p.pools[N_KEY[role]]
    if int(sm.wildcards.n) != int(want):
        raise ValueError(
            f"{sm.output[0]}: n={sm.wildcards.n} in the path, but the config asks for {want}"
        )
    write_pools(
        dataset_cfg=p.dataset,
        role=role,
        pools_cfg=p.pools,
        query_emb_path=str(sm.input.query),
        train_emb_path=str(sm.input.train),
        out_path=str(sm.output[0]),
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

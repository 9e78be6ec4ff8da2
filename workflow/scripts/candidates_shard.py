"""InfoScore candidates of one shard of the training anchors."""

from _common import model_path, run


def main(sm):
    from icdrl.beam import generate_shard

    p = sm.params
    generate_shard(
        dataset_cfg=p.dataset,
        model_cfg=p.model,
        model_path=model_path(sm),
        pools_path=str(sm.input.pools),
        train_emb_path=str(sm.input.train_emb),
        cand_cfg=p.candidates,
        shard=int(sm.wildcards.shard),
        n_shards=int(p.n_shards),
        out_path=str(sm.output[0]),
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

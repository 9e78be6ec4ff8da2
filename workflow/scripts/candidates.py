"""InfoScore candidates of one shard of the training anchors."""

from _common import model_path, run


def main(sm):
    from icdrl.beam import generate_shard

    c = sm.config
    generate_shard(c["dataset"], c["model"], model_path(sm), str(sm.input.pools), str(sm.input.train_emb),
                   c["candidates"], int(sm.wildcards.shard), int(sm.params.n_shards), str(sm.output[0]))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

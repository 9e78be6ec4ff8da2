"""Embeddings of one split (wildcard split: train | eval)."""

from _common import model_path, run


def main(sm):
    from icdrl.embeddings import embed_split

    p = sm.params
    embed_split(
        dataset_cfg=p.dataset,
        split=sm.wildcards.split,
        emb_cfg=p.embeddings,
        model_cfg=p.model,
        model_path=model_path(sm),
        out_path=str(sm.output[0]),
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

"""Embeddings of one split (wildcard split: train | eval)."""

from _common import model_path, run


def main(sm):
    from icdrl.embeddings import embed_split

    c = sm.config
    embed_split(c["dataset"], sm.wildcards.split, c["embeddings"], c["model"], model_path(sm), str(sm.output[0]))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

"""Train the embedded tiny LVLM (config section embedded_lvlm) into a model folder."""

from _common import run


def main(sm):
    from icdrl.lvlm.embedded import train_embedded

    train_embedded(cfg=dict(sm.params.lvlm), out_dir=str(sm.output.model))


run(snakemake, main)  # noqa: F821 - provided by Snakemake

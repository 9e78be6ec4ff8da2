"""Check that the embedded LVLM learns from in-context demonstrations (icl_check.json)."""

from _common import run


def main(sm):
    from icdrl.lvlm.embedded import icl_check

    icl_check(
        model_dir=str(sm.input.model),
        cfg=dict(sm.params.lvlm),
        out_json=str(sm.output[0]),
        threads=sm.threads,
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

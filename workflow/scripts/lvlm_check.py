"""Check that the embedded LVLM learns from in-context demonstrations (icl_check.json)."""

from _common import run


def main(sm):
    from icdrl.lvlm.embedded import icl_check

    icl_check(str(sm.input.model), dict(sm.config["embedded_lvlm"]), str(sm.output[0]), threads=sm.threads)


run(snakemake, main)  # noqa: F821 - provided by Snakemake

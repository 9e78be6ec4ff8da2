"""per_shot of one seed: at each k, the v3 cell best on the validation queries, on the test queries."""

from _common import run


def main(sm):
    from icdrl.evaluate import select_per_shot

    select_per_shot(
        val_paths=[str(p) for p in sm.input.val],
        test_paths=[str(p) for p in sm.input.test],
        out_path=str(sm.output[0]),
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

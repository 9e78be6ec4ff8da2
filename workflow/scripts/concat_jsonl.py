"""Concatenate shard files (in shard order) into one file of the same schema (rules concat_candidates, concat_scored)."""

from _common import run


def main(sm):
    from icdrl.records import concat_jsonl

    n = concat_jsonl(
        paths=[str(p) for p in sm.input], schema=sm.params.schema, out_path=str(sm.output[0])
    )
    print(f"concatenated {n} records from {len(sm.input)} shards into {sm.output[0]}")


run(snakemake, main)  # noqa: F821 - provided by Snakemake

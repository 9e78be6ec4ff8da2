"""VQA scoring of one shard of candidate sequences."""

from _common import model_path, run


def main(sm):
    from icdrl.scoring import score_shard

    p = sm.params
    score_shard(
        dataset_cfg=p.dataset,
        model_cfg=p.model,
        model_path=model_path(sm),
        candidates_path=str(sm.input.candidates),
        scoring_cfg=p.scoring,
        out_path=str(sm.output[0]),
    )


run(snakemake, main)  # noqa: F821 - provided by Snakemake

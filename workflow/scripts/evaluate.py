"""Evaluation at shots 1-4 of a baseline (wildcard method), the v2 selector or a v3 cell."""

from _common import model_path, run


def main(sm):
    from icdrl.evaluate import evaluate_method
    from icdrl.grid import parse_baseline, parse_cell

    c, w = sm.config, sm.wildcards
    kw = {}
    if sm.rule == "evaluate_baseline":
        method, seed = parse_baseline(w.method)
        kw = {} if seed is None else {"seed": seed}
    elif sm.rule == "evaluate_v2":
        method, kw = "v2", {"selector_ckpt": str(sm.input.selector), "seed": int(w.seed)}
    else:
        cell = parse_cell(w.reward, w.adv)
        method, kw = "v3", {"selector_ckpt": str(sm.input.selector), "seed": int(w.seed),
                            "cell": {"slug": cell.slug, **cell.as_record()}}
    eval_cfg = {**c["evaluation"], "metric": c["scoring"]["metric"]}  # acc uses the scoring metric
    evaluate_method(c["dataset"], c["model"], model_path(sm), str(sm.input.test_pools), str(sm.input.eval_emb),
                    str(sm.input.train_emb), method, eval_cfg, str(sm.output[0]), **kw)


run(snakemake, main)  # noqa: F821 - provided by Snakemake

"""Evaluation at shots 1-4 of a baseline (wildcard method), the v2 selector or a v3 cell (param cell;
also on the validation queries when there are any, with the same backend)."""

from _common import model_path, run


def main(sm):
    from icdrl.evaluate import evaluate_method
    from icdrl.grid import parse_baseline
    from icdrl.lvlm import load_backend

    c, w = sm.config, sm.wildcards
    kw = {}
    if sm.rule == "evaluate_baseline":
        method, seed = parse_baseline(w.method)
        kw = {} if seed is None else {"seed": seed}
    elif sm.rule == "evaluate_v2":
        method, kw = "v2", {"selector_ckpt": str(sm.input.selector), "seed": int(w.seed)}
    else:
        method, kw = "v3", {"selector_ckpt": str(sm.input.selector), "seed": int(w.seed), "cell": sm.params.cell}
    eval_cfg = {**c["evaluation"], "metric": c["scoring"]["metric"]}  # acc uses the scoring metric
    # (pools, output) per query role: the test queries, and for v3 the validation queries (one backend)
    jobs = [(str(sm.input.pools), str(sm.output[0]))]
    if method == "v3" and sm.output.val:
        jobs.append((str(sm.input.val_pools), str(sm.output.val)))
    backend = load_backend(c["model"], model_path(sm)) if len(jobs) > 1 else None
    for pools, out in jobs:
        evaluate_method(c["dataset"], c["model"], model_path(sm), pools, str(sm.input.eval_emb), str(sm.input.train_emb),
                        method, eval_cfg, out, backend=backend, **kw)


run(snakemake, main)  # noqa: F821 - provided by Snakemake

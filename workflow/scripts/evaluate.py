"""Evaluation at shots 1-4 of a baseline (wildcard method), the v2 selector or a v3 cell (param cell;
also on the validation queries when there are any, with the same backend); of the RICES variants and
the copy baseline (rule evaluate_rices: one backend); or of both ablations of one eval file (rule
evaluate_ablation: one backend)."""

from _common import model_path, run


def eval_cfg(sm) -> dict:
    """The evaluation section plus the VQA metric of every record's acc (scoring.metric)."""
    return {**sm.config["evaluation"], "metric": sm.config["scoring"]["metric"]}


def rices(sm, xi: bool) -> None:
    from icdrl.evaluate import evaluate_method, write_copy_baseline
    from icdrl.lvlm import load_backend

    c, i = sm.config, sm.input
    out = dict(zip(sm.params.methods, map(str, sm.output), strict=True))
    lvlm = [m for m in out if m != "copy"]
    backend = load_backend(c["model"], model_path(sm)) if lvlm else None
    for m in lvlm:
        evaluate_method(c["dataset"], c["model"], model_path(sm), str(i.pools), str(i.eval_emb), str(i.train_emb), m,
                        eval_cfg(sm), out[m], backend=backend, exclude_same_image=xi)
    write_copy_baseline(c["dataset"], str(i.pools), str(i.eval_emb), str(i.train_emb), eval_cfg(sm),
                        out["copy"], exclude_same_image=xi)


def ablations(sm, xi: bool) -> None:
    from icdrl.ablations import ABLATIONS, evaluate_ablation
    from icdrl.lvlm import load_backend

    c = sm.config
    backend = load_backend(c["model"], model_path(sm))
    for a in ABLATIONS:
        evaluate_ablation(c["dataset"], c["model"], model_path(sm), str(sm.input.base), a, eval_cfg(sm),
                          str(getattr(sm.output, a)), backend=backend, exclude_same_image=xi)


def main(sm):
    from icdrl.evaluate import evaluate_method
    from icdrl.layout import parse_baseline
    from icdrl.lvlm import load_backend

    c, w = sm.config, sm.wildcards
    xi = bool(c["pools"].get("exclude_same_image", False))
    if sm.rule == "evaluate_rices":
        return rices(sm, xi)
    if sm.rule == "evaluate_ablation":
        return ablations(sm, xi)
    kw = {}
    if sm.rule == "evaluate_baseline":
        method, seed = parse_baseline(w.method)
        kw = {} if seed is None else {"seed": seed}
    elif sm.rule == "evaluate_v2":
        method, kw = "v2", {"selector_ckpt": str(sm.input.selector), "seed": int(w.seed)}
    else:
        method, kw = "v3", {"selector_ckpt": str(sm.input.selector), "seed": int(w.seed), "cell": sm.params.cell}
    # (pools, output) per query role: the test queries, and for v3 the validation queries (one backend)
    jobs = [(str(sm.input.pools), str(sm.output[0]))]
    if method == "v3" and sm.output.val:
        jobs.append((str(sm.input.val_pools), str(sm.output.val)))
    backend = load_backend(c["model"], model_path(sm)) if len(jobs) > 1 else None
    for pools, out in jobs:
        evaluate_method(c["dataset"], c["model"], model_path(sm), pools, str(sm.input.eval_emb), str(sm.input.train_emb),
                        method, eval_cfg(sm), out, backend=backend, exclude_same_image=xi, **kw)


run(snakemake, main)  # noqa: F821 - provided by Snakemake

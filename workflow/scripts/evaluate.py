"""Evaluation at shots 1-4, by ``snakemake.params.method``: ``baseline`` (wildcard method), ``v2``
or ``v3`` (param cell; also on the validation queries when there are any, with the same backend);
``rices``: the RICES variants and the copy baseline (one backend); ``ablations``: both ablations of
one eval file (one backend)."""

from _common import model_path, run


def eval_cfg(sm) -> dict:
    """The evaluation section plus the VQA metric of every record's acc (scoring.metric)."""
    return {**sm.params.evaluation, "metric": sm.params.metric}


def rices(sm) -> None:
    from icdrl.evaluate import evaluate_method, write_copy_baseline
    from icdrl.lvlm import load_backend

    p, i = sm.params, sm.input
    out = dict(zip(p.methods, map(str, sm.output), strict=True))
    lvlm = [m for m in out if m != "copy"]
    backend = load_backend(p.model, model_path(sm)) if lvlm else None
    for m in lvlm:
        evaluate_method(
            dataset_cfg=p.dataset,
            model_cfg=p.model,
            model_path=model_path(sm),
            test_pools_path=str(i.pools),
            eval_emb_path=str(i.eval_emb),
            train_emb_path=str(i.train_emb),
            method=m,
            eval_cfg=eval_cfg(sm),
            out_path=out[m],
            backend=backend,
            exclude_same_image=p.exclude_same_image,
        )
    write_copy_baseline(
        dataset_cfg=p.dataset,
        test_pools_path=str(i.pools),
        eval_emb_path=str(i.eval_emb),
        train_emb_path=str(i.train_emb),
        eval_cfg=eval_cfg(sm),
        out_path=out["copy"],
        exclude_same_image=p.exclude_same_image,
    )


def ablations(sm) -> None:
    from icdrl.ablations import ABLATIONS, evaluate_ablation
    from icdrl.lvlm import load_backend

    p = sm.params
    backend = load_backend(p.model, model_path(sm))
    for a in ABLATIONS:
        evaluate_ablation(
            dataset_cfg=p.dataset,
            model_cfg=p.model,
            model_path=model_path(sm),
            base_path=str(sm.input.base),
            ablation=a,
            eval_cfg=eval_cfg(sm),
            out_path=str(getattr(sm.output, a)),
            backend=backend,
            exclude_same_image=p.exclude_same_image,
        )


def selectors(sm) -> None:
    """A baseline, v2 or a v3 cell (v3: on the test and the validation queries)."""
    from icdrl.evaluate import evaluate_method
    from icdrl.layout import parse_baseline
    from icdrl.lvlm import load_backend

    p, w = sm.params, sm.wildcards
    kw = {}
    if p.method == "baseline":
        method, seed = parse_baseline(w.method)
        kw = {} if seed is None else {"seed": seed}
    elif p.method == "v2":
        method, kw = "v2", {"selector_ckpt": str(sm.input.selector), "seed": int(w.seed)}
    else:  # v3 (main checked params.method)
        method, kw = (
            "v3",
            {"selector_ckpt": str(sm.input.selector), "seed": int(w.seed), "cell": p.cell},
        )
    # (pools, output) per query role: the test queries, and for v3 the validation queries (one backend)
    jobs = [(str(sm.input.pools), str(sm.output[0]))]
    if method == "v3" and sm.output.val:
        jobs.append((str(sm.input.val_pools), str(sm.output.val)))
    backend = load_backend(p.model, model_path(sm)) if len(jobs) > 1 else None
    for pools, out in jobs:
        evaluate_method(
            dataset_cfg=p.dataset,
            model_cfg=p.model,
            model_path=model_path(sm),
            test_pools_path=pools,
            eval_emb_path=str(sm.input.eval_emb),
            train_emb_path=str(sm.input.train_emb),
            method=method,
            eval_cfg=eval_cfg(sm),
            out_path=out,
            backend=backend,
            exclude_same_image=p.exclude_same_image,
            **kw,
        )


#: ``params.method`` -> what runs
METHODS = {
    "baseline": selectors,
    "v2": selectors,
    "v3": selectors,
    "rices": rices,
    "ablations": ablations,
}


def main(sm):
    if sm.params.method not in METHODS:
        raise ValueError(
            f"params.method {sm.params.method!r}: expected one of {', '.join(METHODS)}"
        )
    METHODS[sm.params.method](sm)


run(snakemake, main)  # noqa: F821 - provided by Snakemake

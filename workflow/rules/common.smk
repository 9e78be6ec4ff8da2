# Helpers shared by the rules. Paths come from icdrl.layout.Layout (L, in the Snakefile).
#
# The comment above each rule's output: names its path pattern's segments (config/README.md draws
# the tree): <dataset> the dataset label + subsets (easyvqa-train1000-eval300); <model> model.name
# (+ -<dtype>, -sp<hash of system_prompt>; embedded: embedded-<hash of embedded_lvlm>); <encoder>
# the embeddings' encoder (clip-vit-b32; lvlm-<model>, just "lvlm" below <model>/); <pools>
# <sampler>-K<size>-s<seed>[-xi]; <candidates> B<beam_width>-D<depth>-<insert>-r<n_random>-m<n_similar>-s<seed>;
# <scored> scored-t<correct_threshold>-mnt<max_new_tokens>-<metric>; {v2}, {v3} v2-/v3-<hash of
# the training settings>. Stages 1-9: lvlm, embeddings, pools, candidates, scoring, rewards,
# train, evaluate, report (one rule file each, in this order).
from icdrl.report import report_files


def logfile(path):
    """The log of the job writing `path`: beside it."""
    return f"{path}.log"


def benchfile(path):
    """The benchmark TSV of the job writing `path`: beside it."""
    return f"{path}.benchmark.tsv"


def untracked(value):
    """`value` as a rule's params entry that Snakemake's params rerun-trigger does not compare.

    For the config sections a script reads (declared by its rule, since scripts read
    snakemake.params only) whose output-changing keys are already in the rule's output path;
    their other keys (model.batch_size, model.device, embedded_lvlm.threads, dataset file
    paths, ...) change how a job runs, not what it writes, so an edit of them re-runs nothing.
    (Snakemake leaves out of the trigger params computed from a job's threads, input or output.)
    """
    return lambda wildcards, threads: value


def section(name):
    """Config section `name`, :func:`untracked` (see there)."""
    return untracked(config[name])


# the LVLM folder as an input where the workflow trains it (embedded); a hf folder is
# checked at start (onstart) instead, so that dry runs work without the weights
MODEL_INPUT = [L.lvlm_model] if L.embedded else []
# the encoder needs the LVLM only for encoder "lvlm"
ENCODER_INPUT = MODEL_INPUT if config["embeddings"]["encoder"] == "lvlm" else []

REPORT_FILES = report_files(L.report_dir, [e.name for e in L.experiments()])


# ---- evaluation (rules/evaluate.smk)

# what workflow/scripts/evaluate.py reads besides `method` (every key that changes a record is in
# its path: shots, evaluation.random_seed, model.max_new_tokens, scoring.metric, pools.*)
EVAL_PARAMS = dict(
    dataset=section("dataset"),
    model=section("model"),
    evaluation=section("evaluation"),
    metric=untracked(config["scoring"]["metric"]),  # the VQA metric of every record's acc
    exclude_same_image=untracked(L.exclude_same_image),
)


def eval_params(method, **extra):
    """The params of an evaluate_* rule: EVAL_PARAMS, the `method` evaluate.py dispatches on
    (untracked: the rule already fixes it) and the rule's own."""
    return dict(EVAL_PARAMS, method=untracked(method), **extra)


# ---- the report (rules/report.smk)

REPORT_CATEGORY = {
    "summary": "1 Summary",
    "accuracy": "2 Accuracy",
    "accuracy_vs_shot": "2 Accuracy",
    "vs_legacy": "3 Comparisons",
    "delta_vs_legacy": "3 Comparisons",
    "vs_v2": "3 Comparisons",
    "per_shot": "3 Comparisons",
    "diagnostics": "5 Diagnostics",
    "copy_rates": "5 Diagnostics",
    "ablations": "5 Diagnostics",
    "ablation_delta": "5 Diagnostics",
    "rl_groups": "5 RL data",
    "rl_advantages": "5 RL data",
    "reward_hist": "5 RL data",
    "advantage_hist": "5 RL data",
    "candidates_by_source": "5 RL data",
    "training_summary": "6 Training",
    "training_curves": "6 Training",
}


def report_output(path):
    """`path`, marked for the HTML report if it is a table's HTML, a plot's PNG or the summary;
    an experiment's files (exp-<name>, exp-<name>-delta) share one caption per kind."""
    stem, ext = Path(path).stem, Path(path).suffix
    if stem == "config":
        return report(
            path, caption="../report/config.rst", category="8 Config", labels={"shows": "config"}
        )
    if ext not in (".html", ".png"):
        return path
    if stem.startswith("exp-"):
        kind = "experiment_delta" if stem.endswith("-delta") else "experiment"
        name = stem[len("exp-") :].removesuffix("-delta")
        return report(
            path,
            caption=f"../report/{kind}.rst",
            category="4 Experiments",
            subcategory=name,
            labels={"experiment": name, "shows": "plot" if kind.endswith("delta") else "table"},
        )
    return report(
        path,
        caption=f"../report/{stem}.rst",
        category=REPORT_CATEGORY.get(stem, "7 Other"),
        labels={"shows": stem.replace("_", " ")},
    )

# Helpers shared by the rules. Paths come from icdrl.layout.Layout (L, in the Snakefile).
from icdrl.report import report_files


def logfile(path):
    """The log of the job writing `path`: beside it."""
    return f"{path}.log"


def benchfile(path):
    """The benchmark TSV of the job writing `path`: beside it."""
    return f"{path}.benchmark.tsv"


# the LVLM folder as an input where the workflow trains it (embedded); a hf folder is
# checked at start (onstart) instead, so that dry runs work without the weights
MODEL_INPUT = [L.lvlm_model] if L.embedded else []
# the encoder needs the LVLM only for encoder "lvlm"
ENCODER_INPUT = MODEL_INPUT if config["embeddings"]["encoder"] == "lvlm" else []

REPORT_FILES = report_files(L.report_dir, [e.name for e in L.experiments()])


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
        return report(path, caption="../report/config.rst", category="8 Config", labels={"shows": "config"})
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


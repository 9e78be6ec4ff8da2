"""icdrl: which in-context demonstrations to show a vision-language model.

Stages (one rule file each, workflow/rules/): 1 [embedded LVLM] (lvlm.smk) -> 2 embeddings ->
3 pools -> 4 InfoScore candidates (sharded) -> 5 VQA scoring (sharded) -> 6 rewards per mode ->
7 selector training (v2 per seed, v3 per grid cell and seed) -> 8 evaluation at shots 1-4 (test
queries; v3 cells also on validation queries, for per_shot) -> 9 report. The grid is the union of
the configured experiments (grid.experiments): reward mode, use_rank, weights, any reward or v3
training knob, x seed. Paths: icdrl.layout.Layout (each rule's output carries a comment naming
its pattern).

    snakemake --cores 2                                  # the embedded default (config/config.yaml)
    snakemake --cores 8 --use-conda --resources gpu=1 --configfile config/okvqa_qwen2.5vl3b.yaml
    snakemake --profile profiles/slurm --configfile config/okvqa_qwen2.5vl3b.yaml

A config file given with --configfile replaces config/config.yaml (it is not merged into it);
keys it leaves out take the schema's defaults. See README.md and config/README.md.
"""

import os
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# the library: the checkout's src/ first, so `snakemake` works without installing icdrl and
# never imports another installed copy (jobs do the same: workflow/scripts/_common.py)
_SRC = Path(workflow.basedir).resolve() / "src"
sys.path.insert(0, str(_SRC))
import icdrl.config as icfg  # noqa: E402
from icdrl.grid import ADV, REWARD_SLUG_RE, canonical_json  # noqa: E402
from icdrl.layout import BASELINE_RE, V2_TAG_RE, V3_TAG_RE, Layout  # noqa: E402

if Path(icfg.__file__).resolve().parent != _SRC / "icdrl":
    sys.exit(
        f"icdrl: imported from {Path(icfg.__file__).resolve().parent}, not from this checkout's {_SRC / 'icdrl'}"
    )


if not workflow.config_settings.configfiles:

    configfile: f"{workflow.basedir}/config/config.yaml"


# the config file(s) this run reads: config errors name the one that sets the key, or these
CONFIG_FILES = [str(p) for p in workflow.config_settings.configfiles] or [
    f"{workflow.basedir}/config/config.yaml"
]


try:
    _overrides = icfg.prepare(config, os.environ)
except ValueError as e:  # ConfigError, or a bad env-var value: one line naming the key
    sys.exit(f"icdrl: {icfg.name_sources(str(e), CONFIG_FILES, workflow.config_settings.config)}")
if _overrides:
    print(icfg.describe_overrides(_overrides), file=sys.stderr)

L = Layout(config)


wildcard_constraints:
    split="train|eval",
    role="anchors|test|val",
    n=r"\d+",
    shard=r"\d+",
    seed=r"\d+",
    reward=REWARD_SLUG_RE,
    adv="|".join(ADV.values()),
    v2=V2_TAG_RE,
    v3=V3_TAG_RE,
    method=BASELINE_RE,


# the top-level text of `snakemake --report` (per-file captions: workflow/report/<name>.rst)
report: "workflow/report/workflow.rst"


onstart:
    # before the first job, never in a dry run: one line naming a missing dataset file or model folder
    try:
        icfg.check_inputs(config)
    except (ValueError, OSError) as e:
        sys.exit(
            f"icdrl: {icfg.name_sources(str(e), CONFIG_FILES, workflow.config_settings.config)}"
        )


onsuccess:
    # after a run that succeeded (never a dry run): the report folder's name is a hash, so say it
    print(
        f"icdrl: the report is in {L.report_dir}/ (start with summary.md); one HTML file of it: "
        f"snakemake --report results/report.html, with this run's --configfile",
        file=sys.stderr,
    )


include: "workflow/rules/common.smk"
include: "workflow/rules/lvlm.smk"
include: "workflow/rules/embeddings.smk"
include: "workflow/rules/pools.smk"
include: "workflow/rules/candidates.smk"
include: "workflow/rules/scoring.smk"
include: "workflow/rules/rewards.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        REPORT_FILES,
        [L.icl_check] if L.embedded else [],

# Stage 1: the embedded tiny LVLM (model.kind: embedded): trained first, then its in-context check.
# For model.kind: hf the model folder is model.path, checked before the first job (onstart).

if L.embedded:

    rule train_lvlm:
        # results/lvlm/<model.name>-<hash of embedded_lvlm>/model/
        output:
            model=directory(L.lvlm_model),
        log:
            logfile(L.lvlm_model),
        benchmark:
            benchfile(L.lvlm_model)
        conda:
            "../envs/icdrl.yaml"
        threads: config["embedded_lvlm"]["threads"]
        params:
            # all of it: embedded_config.json in the folder records it (its path hashes the
            # knobs that change the model)
            lvlm=section("embedded_lvlm"),
        script:
            "../scripts/train_lvlm.py"

    rule icl_check:
        input:
            model=L.lvlm_model,
        # results/lvlm/<model.name>-<hash of embedded_lvlm>/icl_check.json
        output:
            report(
                L.icl_check,
                caption="../report/icl_check.rst",
                category="8 Config",
                labels={"shows": "embedded LVLM in-context check"},
            ),
        log:
            logfile(L.icl_check),
        benchmark:
            benchfile(L.icl_check)
        conda:
            "../envs/icdrl.yaml"
        # a side check nothing downstream waits for: one core, so the pipeline runs beside it
        threads: 1
        params:
            # the check's own knobs (not part of the model's path): a change reruns only the
            # check; canonical JSON, so that key order and 1 vs 1.0 are no change
            check=canonical_json(config["embedded_lvlm"]["check"]),
            lvlm=section("embedded_lvlm"),
        script:
            "../scripts/icl_check.py"

# Stage 2: L2-normalised image+question embeddings of a split (encoder lvlm or clip).


rule embed:
    input:
        model=ENCODER_INPUT,
    # results/<dataset>/emb/<encoder>/{split}.npz
    output:
        L.emb,
    log:
        logfile(L.emb),
    benchmark:
        benchfile(L.emb)
    conda:
        "../envs/icdrl.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        dataset=section("dataset"),
        embeddings=section("embeddings"),
        model=section("model"),
    script:
        "../scripts/embed.py"

# Stage 2: L2-normalised image+question embeddings of a split (encoder lvlm or clip).


rule embed:
    input:
        model=ENCODER_INPUT,
    # results/<dataset>/emb/<encoder>/{split}.npz
    output:
        L.emb,
    params:
        dataset=section("dataset"),
        embeddings=section("embeddings"),
        model=section("model"),
    log:
        logfile(L.emb),
    benchmark:
        benchfile(L.emb)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/icdrl.yaml"
    script:
        "../scripts/embed.py"

"""HFBackend on tiny random Qwen2.5-VL and LLaVA checkpoints saved to disk and loaded like real ones.

Covers docs/science.md §3: the answer span comes from the chat-formatted token ids (and decodes to the
answer), batch == one at a time, left == right padding, the cached paths == the processor
called normally, images preprocessed once per backend, greedy generation == plain
transformers generation, and config errors.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from icdrl.data import Example
from icdrl.lvlm import ModelConfigError, check_model_cfg, load_backend
from icdrl.lvlm.base import answer_prob
from icdrl.lvlm.hf import BackendError, HFBackend
from icdrl.lvlm.prompt import postprocess
from icdrl.lvlm.tiny import cached_checkpoint

FAMILIES = ["qwen", "llava"]
TOL = 1e-4


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    spec = [
        ("red", (64, 64)),
        ("blue", (64, 64)),
        ("green", (32, 128)),
        ("teal", (64, 64)),
        ("gray", (96, 48)),
        ("yellow", (64, 64)),
    ]
    paths = []
    for i, (colour, size) in enumerate(spec):
        p = d / f"{i}.png"
        Image.new("RGB", size, colour).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="session")
def ex(images):
    qa = [
        ("what color is the shape?", "red"),
        ("what shape is present?", "circle"),
        ("is there a green shape?", "yes"),
        ("what color is the triangle?", "teal"),
        ("how many dogs are there?", "2"),
        ("what is the dog near?", "fire hydrant"),
    ]
    return [Example(i, images[i], q, (a,), a, image_id=str(i)) for i, (q, a) in enumerate(qa)]


@pytest.fixture(scope="session")
def prompts(ex):
    """Mixed numbers of demonstrations (0-4), hence mixed lengths and image counts."""
    return [
        ([], ex[0]),
        ([ex[1]], ex[0]),
        ([ex[1], ex[2], ex[3], ex[4]], ex[5]),
        ([ex[3], ex[1]], ex[2]),
        ([ex[5], ex[4], ex[0]], ex[1]),
        ([ex[2]], ex[4]),
    ]


ANSWERS = ["red", "teal", "fire hydrant", "yes", "circle", "2"]


_BACKENDS: dict = {}


def backend(family: str, **cfg) -> HFBackend:
    key = (family, tuple(sorted(cfg.items())))
    if key not in _BACKENDS:
        _BACKENDS[key] = load_backend(
            {"kind": "hf", "batch_size": 4, **cfg}, str(cached_checkpoint(family))
        )
    return _BACKENDS[key]


def sums(scores):
    return [s.sum_logprob for s in scores]


# ---------------------------------------------------------------------- answer span


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["features", "none"])
def test_span_tokens_decode_to_the_answer(family, mode, prompts):
    b = backend(family, image_cache=mode)
    for pr, ans in zip(prompts, ANSWERS):
        e = b.encode(pr, ans)
        span = e.input_ids[e.answer_start : e.answer_end]
        assert b.tokenizer.decode(list(span)).strip() == ans
        # the answer is followed by end-of-turn tokens, not part of the span
        assert e.answer_end < len(e.input_ids)
        assert b.tokenizer.eos_token_id in e.input_ids[e.answer_end :]


@pytest.mark.parametrize("family", FAMILIES)
def test_span_is_the_prefix_full_diff_of_chat_token_ids(family, prompts):
    b = backend(family)
    for pr, ans in zip(prompts, ANSWERS):
        gen = b.encode(pr)  # ends with the generation prompt
        full = b.encode(pr, ans)
        assert full.input_ids[: len(gen.input_ids)] == gen.input_ids
        assert full.answer_start == len(gen.input_ids)
        assert full.answer_end - full.answer_start == len(
            b.tokenizer(ans, add_special_tokens=False)["input_ids"]
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_ids_equal_processor_ids(family, prompts, ex):
    """The piecewise, cached tokenisation equals the processor on the whole chat text + images."""
    from icdrl.data import load_image

    b = backend(family)
    for pr, ans in zip(prompts, ANSWERS):
        demos, query = pr
        text = b.render(pr, ans)
        out = b.processor(
            text=[text], images=[load_image(e.image) for e in (*demos, query)], return_tensors="pt"
        )
        assert tuple(out["input_ids"][0].tolist()) == b.encode(pr, ans).input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_anchors_defect_1_plain_text_length_span_differs(family, prompts):
    """docs/defects.md defect 1 the other way: a span from a plain-text length is not the answer span."""
    b = backend(family)
    pr, ans = prompts[2], ANSWERS[2]
    demos, query = pr
    e = b.encode(pr, ans)
    plain = "".join(f"Question: {d.question} Short answer: {d.answer}\n" for d in demos)
    plain += f"Question: {query.question} Short answer:"
    wrong_start = len(b.tokenizer(plain, add_special_tokens=False)["input_ids"])
    assert wrong_start != e.answer_start
    wrong = e.input_ids[wrong_start : e.answer_end]
    assert len(wrong) > 10 * (e.answer_end - e.answer_start)  # it averages over most of the prompt
    assert b.tokenizer.decode(list(wrong)).strip() != ans
    # and the scores differ: mean log-prob over the wrong span vs ours
    ids = torch.tensor([e.input_ids[: e.answer_end]])
    with torch.no_grad():
        kw = b._collate([b._item_cached(pr, ans)], left=True)[0]
        logp = torch.log_softmax(b.model(**kw).logits[0].float(), -1)
    tok = ids[0]
    lp = logp[:-1].gather(-1, tok[1:, None]).squeeze(-1)
    ours = float(lp[e.answer_start - 1 : e.answer_end - 1].sum())
    theirs_mean = float(lp[wrong_start - 1 : e.answer_end - 1].mean())
    (score,) = b.answer_logprobs([pr], [ans])
    assert score.sum_logprob == pytest.approx(ours, abs=TOL)
    assert abs(score.mean_logprob - theirs_mean) > 1e-3


# ---------------------------------------------------------------------- batching, padding, cache paths


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_at_a_time(family, prompts):
    b = backend(family)
    batched = sums(b.answer_logprobs(prompts, ANSWERS))
    single = [b.answer_logprobs([p], [a])[0].sum_logprob for p, a in zip(prompts, ANSWERS)]
    assert batched == pytest.approx(single, abs=TOL)
    assert all(s < 0 for s in batched)
    n = [s.n_tokens for s in b.answer_logprobs(prompts, ANSWERS)]
    assert n == [1, 1, 2, 1, 1, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padding_agree(family, prompts):
    left = sums(backend(family, padding_side="left").answer_logprobs(prompts, ANSWERS))
    right = sums(backend(family, padding_side="right").answer_logprobs(prompts, ANSWERS))
    assert left == pytest.approx(right, abs=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_paths_equal_reference_path(family, prompts):
    ref = backend(family, image_cache="none")
    want = sums(ref.answer_logprobs(prompts, ANSWERS))
    for mode in ("features", "pixels"):
        b = backend(family, image_cache=mode)
        assert sums(b.answer_logprobs(prompts, ANSWERS)) == pytest.approx(want, abs=TOL)
        for pr, ans in zip(prompts, ANSWERS):
            assert b.encode(pr, ans) == ref.encode(pr, ans)


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_change_the_score(family, prompts):
    b = backend(family)
    a = sums(b.answer_logprobs(prompts[:3], ["red", "red", "red"]))
    c = sums(b.answer_logprobs(prompts[:3], ["blue", "blue", "blue"]))
    assert all(abs(x - y) > 1e-6 for x, y in zip(a, c))
    p = answer_prob(b, prompts[:3], ["red"] * 3)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()


def test_images_preprocessed_once_per_backend(prompts):
    b = load_backend({"kind": "hf", "batch_size": 2}, str(cached_checkpoint("qwen")))
    many = prompts * 5
    b.answer_logprobs(many, ANSWERS * 5)
    b.generate(many, max_new_tokens=2)
    distinct = {e.image for demos, q in prompts for e in (*demos, q)}
    assert b.stats["image_preprocess"] == len(distinct)
    assert b.stats["vision_encoded"] == len(distinct)
    b.clear_cache()
    b.answer_logprobs(prompts[:1], ANSWERS[:1])
    assert b.stats["image_preprocess"] == len(distinct) + 1


def test_small_lru_cache_gives_the_same_numbers(prompts):
    big = backend("qwen")
    small = load_backend(
        {"kind": "hf", "batch_size": 2, "image_cache_size": 1}, str(cached_checkpoint("qwen"))
    )
    assert sums(small.answer_logprobs(prompts, ANSWERS)) == pytest.approx(
        sums(big.answer_logprobs(prompts, ANSWERS)), abs=TOL
    )
    assert len(small._cache) <= 5  # bounded by one batch's images


# ---------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_plain_transformers_greedy(family, prompts):
    from icdrl.data import load_image

    b = backend(family)
    gens = b.generate(prompts, max_new_tokens=4)
    for pr, g in zip(prompts, gens):
        demos, query = pr
        inputs = b.processor(
            text=[b.render(pr)],
            images=[load_image(e.image) for e in (*demos, query)],
            return_tensors="pt",
        )
        with torch.no_grad():
            out = b.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        raw = b.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert g.raw == raw
        assert g.answer == postprocess(raw)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batch_equals_single_and_modes_agree(family, prompts):
    b = backend(family)
    batched = [g.raw for g in b.generate(prompts, max_new_tokens=3)]
    assert batched == [b.generate([p], max_new_tokens=3)[0].raw for p in prompts]
    assert batched == [
        g.raw for g in backend(family, image_cache="none").generate(prompts, max_new_tokens=3)
    ]
    assert batched == [
        g.raw for g in backend(family, image_cache="pixels").generate(prompts, max_new_tokens=3)
    ]


def test_generate_respects_max_new_tokens(prompts):
    b = backend("qwen")
    for n in (1, 5):
        for g in b.generate(prompts, max_new_tokens=n):
            assert len(b.tokenizer(g.raw, add_special_tokens=False)["input_ids"]) <= n
    assert b.max_new_tokens == 10  # config default


# ---------------------------------------------------------------------- config


def test_system_prompt_goes_into_the_chat_text(prompts):
    b = load_backend(
        {"kind": "hf", "system_prompt": "answer with one word ."}, str(cached_checkpoint("qwen"))
    )
    assert b.render(prompts[0]).startswith("<|im_start|>system\nanswer with one word .<|im_end|>")
    plain = backend("qwen")
    assert sums(b.answer_logprobs(prompts[:2], ANSWERS[:2])) != pytest.approx(
        sums(plain.answer_logprobs(prompts[:2], ANSWERS[:2])), abs=1e-6
    )


@pytest.mark.parametrize(
    "bad", ["Here are four examples.", "Use the 4 examples above", "a 3-shot task"]
)
def test_system_prompt_with_fixed_count_rejected(bad):
    with pytest.raises(
        ModelConfigError, match=r"^model\.system_prompt: must not state a fixed number"
    ):
        check_model_cfg({"system_prompt": bad})


def test_model_config_errors(tmp_path):
    with pytest.raises(
        ModelConfigError, match=rf"^model\.path: model folder not found: {tmp_path / 'nope'}$"
    ):
        load_backend({"kind": "hf"}, str(tmp_path / "nope"))
    with pytest.raises(ModelConfigError, match=r"^model\.path: not set"):
        load_backend({"kind": "hf"})
    with pytest.raises(ModelConfigError, match=r"has no config\.json"):
        load_backend({"kind": "hf"}, str(tmp_path))
    with pytest.raises(ModelConfigError, match=r"^model\.dtype: 'fp8'"):
        check_model_cfg({"dtype": "fp8"})
    with pytest.raises(ModelConfigError, match=r"^model\.batchsize: unknown key"):
        check_model_cfg({"batchsize": 8})
    with pytest.raises(ModelConfigError, match=r"^model\.batch_size: must be a positive integer"):
        check_model_cfg({"batch_size": 0})
    with pytest.raises(ModelConfigError, match=r"^model\.kind"):
        check_model_cfg({"kind": "openai"})
    with pytest.raises(ModelConfigError, match=r"^model\.device: 'gpu'"):
        check_model_cfg({"device": "gpu"})
    with pytest.raises(ModelConfigError, match=r"^model\.image_cache: 'all'"):
        check_model_cfg({"image_cache": "all"})
    auto = load_backend({"kind": "embedded", "device": "auto"}, str(cached_checkpoint("qwen")))
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = check_model_cfg({"kind": "hf", "path": "/x"})
    assert (
        cfg["max_new_tokens"] == 10 and cfg["system_prompt"] is None and cfg["dtype"] == "float32"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda_fails():
    with pytest.raises(BackendError, match=r"^model\.device: 'cuda' requested but no CUDA device"):
        load_backend({"kind": "hf", "device": "cuda"}, str(cached_checkpoint("qwen")))


def test_bad_calls(prompts):
    b = backend("qwen")
    with pytest.raises(BackendError, match="empty answer"):
        b.answer_logprobs(prompts[:1], ["  "])
    with pytest.raises(BackendError, match="1 prompts but 2 answers"):
        b.answer_logprobs(prompts[:1], ["a", "b"])
    assert b.answer_logprobs([], []) == [] and b.generate([]) == []


# ---------------------------------------------------------------------- CUDA + bf16 (skipped on CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_matches_cpu_float32(family, prompts):
    gpu = load_backend(
        {"kind": "hf", "device": "cuda", "dtype": "bfloat16", "batch_size": 4},
        str(cached_checkpoint(family)),
    )
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    got = sums(gpu.answer_logprobs(prompts, ANSWERS))
    single = [gpu.answer_logprobs([p], [a])[0].sum_logprob for p, a in zip(prompts, ANSWERS)]
    right = sums(
        load_backend(
            {"kind": "hf", "device": "cuda", "dtype": "bfloat16", "padding_side": "right"},
            str(cached_checkpoint(family)),
        ).answer_logprobs(prompts, ANSWERS)
    )
    want = sums(backend(family).answer_logprobs(prompts, ANSWERS))
    assert got == pytest.approx(want, abs=0.1)  # bf16 rounding
    assert got == pytest.approx(single, abs=0.05)
    assert got == pytest.approx(right, abs=0.05)
    assert len(gpu.generate(prompts, max_new_tokens=3)) == len(prompts)


def test_full_logits_fallback_gives_the_same_numbers(prompts):
    """Models whose forward has no ``logits_to_keep`` are scored from the full logits."""
    fast = backend("qwen")
    slow = load_backend({"kind": "hf", "batch_size": 4}, str(cached_checkpoint("qwen")))
    slow._keeps_logits = False
    assert sums(slow.answer_logprobs(prompts, ANSWERS)) == pytest.approx(
        sums(fast.answer_logprobs(prompts, ANSWERS)), abs=TOL
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_runs_only_at_scored_columns_with_the_same_numbers(
    family, prompts, ex, monkeypatch
):
    """The last layer's attention queries, o_proj and MLP cover one column per scored answer
    token; the scores equal those of the unchanged forward."""
    from transformers.modeling_utils import AttentionInterface

    from icdrl.lvlm import hf

    fast = load_backend({"kind": "hf", "batch_size": 4}, str(cached_checkpoint(family)))
    plain = load_backend({"kind": "hf", "batch_size": 4}, str(cached_checkpoint(family)))
    plain._last = None  # every column through every part, as transformers runs it
    last = fast._last_layer_parts()
    assert len(last.rowwise) == 2 and last.attn is not None
    seen, queries, no_mask = [], [], []
    hooks = [
        m.register_forward_hook(lambda mod, a, out: seen.append(tuple(a[0].shape[:2])))
        for m in last.rowwise
    ]

    def counted(module, query, *args, **kwargs):
        out = hf._scored_columns_attention(module, query, *args, **kwargs)
        queries.append((query.shape[2], hf._scored.pos.shape[1]))
        no_mask.append(args[2] is None)
        return out

    monkeypatch.setitem(AttentionInterface._global_mapping, hf._SCORED_COLUMNS, counted)
    # first one row, no padding, nothing cached yet: transformers passes no mask (causal)
    calls = [
        [([ex[4]], ex[3])],
        prompts,
        [([ex[1]], ex[0]), ([ex[2]], ex[0])],
        [([ex[2], ex[1]], ex[0]), ([ex[3], ex[1]], ex[0])],
    ]
    answers = [[ex[3].answer], ANSWERS, [ex[0].answer] * 2, [ex[0].answer] * 2]
    try:
        for pr, ans in zip(calls, answers):  # later calls run on cached prefixes (qwen)
            want = sums(plain.answer_logprobs(pr, ans))
            assert sums(fast.answer_logprobs(pr, ans)) == pytest.approx(want, abs=TOL)
    finally:
        for h in hooks:
            h.remove()
    n_tokens = [len(fast.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in ANSWERS]
    assert max(n_tokens) > 1  # a multi-token answer among them
    # [rows, longest answer in the batch] instead of [rows, prompt length] (tens of tokens)
    assert all(1 <= cols <= max(n_tokens) for _, cols in seen) and any(cols > 1 for _, cols in seen)
    assert sum(rows for rows, _ in seen) == 2 * (len(prompts) + 5)
    assert len(queries) == len(seen) // 2 and all(m <= max(n_tokens) < n for n, m in queries)
    assert any(no_mask) and not all(no_mask)  # both the causal and the padded/prefix masks
    assert last.attn.config._attn_implementation in ("sdpa", "eager")  # restored after each forward
    if family == "qwen":
        assert fast.stats["prefix_hits"] >= 2


@pytest.fixture(scope="session")
def hub_qwen(tmp_path_factory):
    import shutil

    from icdrl.lvlm.tiny import to_hub_layout_qwen

    d = tmp_path_factory.mktemp("hub") / "qwen"
    shutil.copytree(cached_checkpoint("qwen"), d)
    return str(to_hub_layout_qwen(d))


def test_hub_layout_qwen_folder_loads_without_torchvision(hub_qwen, prompts):
    """A folder laid out like Qwen2.5-VL-3B-Instruct on the hub (processor_class
    Qwen2_5_VLProcessor, preprocessor_config.json, chat_template.json) loads and scores."""
    from transformers import AutoProcessor

    from icdrl.lvlm.qwen import Qwen2_5_VLImageProcessor

    try:
        AutoProcessor.from_pretrained(hub_qwen)
        auto_ok = True
    except ImportError:  # the stock processor's video processor needs torchvision
        auto_ok = False
    b = load_backend({"kind": "hf", "batch_size": 4}, hub_qwen)
    assert isinstance(b.processor, Qwen2_5_VLImageProcessor) or auto_ok
    assert b.render(prompts[0]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    )
    ref = load_backend({"kind": "hf", "batch_size": 4, "image_cache": "none"}, hub_qwen)
    got = sums(b.answer_logprobs(prompts, ANSWERS))
    assert got == pytest.approx(sums(ref.answer_logprobs(prompts, ANSWERS)), abs=TOL)
    assert got == pytest.approx(
        [b.answer_logprobs([p], [a])[0].sum_logprob for p, a in zip(prompts, ANSWERS)], abs=TOL
    )
    for pr, ans in zip(prompts, ANSWERS):
        e = b.encode(pr, ans)
        assert b.tokenizer.decode(list(e.input_ids[e.answer_start : e.answer_end])).strip() == ans
        assert e == ref.encode(pr, ans)
    assert [g.raw for g in b.generate(prompts, 3)] == [g.raw for g in ref.generate(prompts, 3)]


def test_generate_is_pure_greedy_despite_checkpoint_penalties(prompts):
    """A checkpoint's repetition penalty (Qwen ships 1.05) must not change the greedy answer."""
    plain = backend("qwen")
    want = [g.raw for g in plain.generate(prompts, max_new_tokens=4)]
    b = load_backend({"kind": "hf", "batch_size": 4}, str(cached_checkpoint("qwen")))
    b.model.generation_config.repetition_penalty = 50.0
    b.model.generation_config.no_repeat_ngram_size = 1
    assert [g.raw for g in b.generate(prompts, max_new_tokens=4)] == want
    # and the penalties would have changed it (so this test can fail)
    from icdrl.data import load_image

    demos, query = prompts[2]
    inputs = b.processor(
        text=[b.render(prompts[2])],
        images=[load_image(e.image) for e in (*demos, query)],
        return_tensors="pt",
    )
    with torch.no_grad():
        out = b.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    penalised = b.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert penalised != want[2]


# ---------------------------------------------------------------------- beam-search speed paths


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("system_prompt", [None, "Answer the question about the image."])
def test_skeleton_rendering_equals_the_chat_template(family, system_prompt, prompts, ex):
    """Every shape (0-4 demonstrations, with and without the answer turn), far past the checked renders."""
    b = load_backend({"kind": "hf", "system_prompt": system_prompt}, str(cached_checkpoint(family)))
    for _ in range(2):
        for pr, ans in zip(prompts, ANSWERS):
            for a in (ans, None):
                want = b.processor.apply_chat_template(
                    b.messages(pr, a), tokenize=False, add_generation_prompt=a is None
                )
                assert b.render(pr, a) == want
    assert b._use_skeletons and b._skeletons


def test_template_that_alters_text_items_falls_back_to_full_rendering(prompts):
    b = load_backend({"kind": "hf"}, str(cached_checkpoint("qwen")))
    b.processor.chat_template = b.processor.chat_template.replace(
        "content['text']", "content['text'] | upper"
    )
    pr = prompts[2]
    assert "QUESTION" in b.render(pr, "x")  # the template really changed
    want = b.processor.apply_chat_template(b.messages(pr, "x"), tokenize=False)
    assert b.render(pr, "x") == want
    assert not b._use_skeletons


def test_composed_rope_positions_equal_the_models(prompts):
    """Mixed image sizes (different grids) and 0-4 demonstrations, left and right padding."""
    for side in ("left", "right"):
        b = load_backend({"kind": "hf", "padding_side": side}, str(cached_checkpoint("qwen")))
        items = b._items(prompts, ANSWERS)
        inputs, _ = b._collate(items, side == "left", positions=True)
        assert b._mrope and "position_ids" in inputs
        types = torch.tensor(b.processor.create_mm_token_type_ids(inputs["input_ids"]))
        assert torch.equal(types, inputs["mm_token_type_ids"])
        ref, _ = b.model.model.get_rope_index(
            inputs["input_ids"],
            types,
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        real = inputs["attention_mask"].bool()
        assert torch.equal(ref[:, real], inputs["position_ids"][:, real])


def test_wrong_composed_positions_switch_composition_off(prompts):
    b = load_backend({"kind": "hf"}, str(cached_checkpoint("qwen")))
    want = sums(backend("qwen", prefix_cache_size=0).answer_logprobs(prompts, ANSWERS))

    def doubled(item, cut, types, pos):
        HFBackend._layout_into(item, cut, types, pos)
        pos *= 2  # a view into the batch's positions

    b._layout_into = doubled
    assert sums(b.answer_logprobs(prompts, ANSWERS)) == pytest.approx(want, abs=TOL)
    assert not b._mrope and b.stats["prefix_hits"] == 0


def _steps(ex, insert):
    """Beam-search-like calls: every 1-demonstration prompt, then 2-demonstration ones built on them."""
    q = ex[5]
    pool = ex[:5]
    step1 = [([c], q) for c in pool]
    step2 = [
        ([c, b] if insert == "first" else [b, c], q) for b in pool[:2] for c in pool if c is not b
    ]
    step3 = [
        ([c, *d], q) if insert == "first" else ([*d, c], q)
        for d, _ in step2[:3]
        for c in pool
        if c not in d
    ]
    return [step1, step2, step3]


@pytest.mark.parametrize("insert", ["first", "last"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_prefix_cache_gives_the_numbers_of_full_forwards(ex, insert, side):
    cached = load_backend(
        {"kind": "hf", "batch_size": 4, "padding_side": side}, str(cached_checkpoint("qwen"))
    )
    plain = load_backend(
        {"kind": "hf", "batch_size": 4, "prefix_cache_size": 0}, str(cached_checkpoint("qwen"))
    )
    ref = load_backend(
        {"kind": "hf", "batch_size": 1, "image_cache": "none"}, str(cached_checkpoint("qwen"))
    )
    hits = 0
    for step in _steps(ex, insert):
        answers = ["fire hydrant"] * len(step)  # two answer tokens
        got = sums(cached.answer_logprobs(step, answers))
        assert cached.stats["prefix_hits"] - hits == (0 if len(step[0][0]) == 1 else len(step))
        hits = cached.stats["prefix_hits"]
        assert got == pytest.approx(sums(plain.answer_logprobs(step, answers)), abs=1e-5)
        assert got == pytest.approx(sums(ref.answer_logprobs(step, answers)), abs=1e-5)
    assert plain.stats["prefix_hits"] == 0


def test_prefix_max_demos_keeps_only_the_prefixes_a_deeper_prompt_can_read(ex):
    """Depth 2: the step-2 prompts' 2-demonstration prefixes are not stored; the step-1 ones
    stay (a small cache would otherwise lose them to the step-2 ones) and serve later calls."""
    b = load_backend(
        {"kind": "hf", "batch_size": 4, "prefix_cache_size": 5}, str(cached_checkpoint("qwen"))
    )
    plain = load_backend(
        {"kind": "hf", "batch_size": 4, "prefix_cache_size": 0}, str(cached_checkpoint("qwen"))
    )
    b.prefix_max_demos = 1
    step1, step2, _ = _steps(ex, "first")
    extra = [([c, d], ex[5]) for c, d in ((ex[3], ex[4]), (ex[4], ex[2]))]  # 2-demonstration extras
    for call in (step1, step2, extra):
        answers = ["fire hydrant"] * len(call)
        assert sums(b.answer_logprobs(call, answers)) == pytest.approx(
            sums(plain.answer_logprobs(call, answers)), abs=1e-5
        )
        # five 1-demonstration prefixes (the size) and, not counted in it, the chat header
        assert sorted(pk.n_images for pk in b._prefix_kv.values()) == [0, 1, 1, 1, 1, 1]
    assert b.stats["prefix_hits"] == len(step2) + len(extra)


def test_prefix_cache_mixed_batches_and_eviction(ex, prompts):
    """Rows with and without a cached prefix in one call; a cache of 2 entries stays bounded."""
    b = load_backend(
        {"kind": "hf", "batch_size": 3, "prefix_cache_size": 2}, str(cached_checkpoint("qwen"))
    )
    plain = backend("qwen", prefix_cache_size=0)
    b.answer_logprobs([([ex[1]], ex[0]), ([ex[3]], ex[0])], ["red", "red"])
    mixed = [
        ([ex[1], ex[2]], ex[0]),
        ([ex[4], ex[2]], ex[0]),
        ([ex[3], ex[5], ex[2]], ex[0]),
        *prompts,
    ]
    answers = ["red", "red", "red", *ANSWERS]
    assert sums(b.answer_logprobs(mixed, answers)) == pytest.approx(
        sums(plain.answer_logprobs(mixed, answers)), abs=1e-5
    )
    assert b.stats["prefix_hits"] >= 2
    assert len([pk for pk in b._prefix_kv.values() if pk.n_images]) <= 2  # (and the chat header)
    b.clear_cache()
    assert not b._prefix_kv


def test_prefix_cache_is_keyed_by_image_not_only_tokens(ex, images):
    """Two demonstrations with the same text but different images are different prefixes."""
    twin = Example(99, images[5], ex[1].question, ex[1].answers, ex[1].answer, image_id="99")
    b = load_backend({"kind": "hf"}, str(cached_checkpoint("qwen")))
    plain = backend("qwen", prefix_cache_size=0)
    b.answer_logprobs([([ex[1]], ex[0])], ["red"])
    step = [([ex[1], ex[2]], ex[0]), ([twin, ex[2]], ex[0])]
    assert [b._lookup_prefix(it).n_images for it in b._items(step, ["red", "red"])] == [1, 0]
    b.stats["prefix_hits"] = 0
    assert sums(b.answer_logprobs(step, ["red", "red"])) == pytest.approx(
        sums(plain.answer_logprobs(step, ["red", "red"])), abs=1e-5
    )
    assert (
        b.stats["prefix_hits"] == 2
    )  # ex[1]'s row on its 1-demonstration prefix, the twin's on the chat header


def test_chat_header_prefix_serves_every_later_prompt(ex, prompts):
    """The ids before the first image (the chat header) are one cached prefix: once any prompt
    ran, a zero-shot prompt or one with new demonstrations runs on it, with the same numbers."""
    b = load_backend({"kind": "hf", "batch_size": 4}, str(cached_checkpoint("qwen")))
    plain = backend("qwen", prefix_cache_size=0)
    b.answer_logprobs([([ex[1]], ex[0])], ["red"])
    fresh = [([], ex[2]), ([ex[3]], ex[4]), ([ex[5], ex[0]], ex[1])]
    answers = ["yes", "2", "circle"]
    assert sums(b.answer_logprobs(fresh, answers)) == pytest.approx(
        sums(plain.answer_logprobs(fresh, answers)), abs=1e-5
    )
    assert b.stats["prefix_hits"] == len(fresh)
    header = [pk for pk in b._prefix_kv.values() if pk.n_images == 0]
    assert len(header) == 1 and 0 < header[0].length < len(b._items(fresh[:1], answers[:1])[0].ids)


def test_llava_has_no_prefix_cache(prompts):
    b = load_backend({"kind": "hf"}, str(cached_checkpoint("llava")))
    b.answer_logprobs(prompts, ANSWERS)
    b.answer_logprobs(prompts, ANSWERS)
    assert b.stats["prefix_hits"] == 0 and not b._prefix_kv


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_image_preprocessing_equals_one_at_a_time(family, images):
    """Mixed image sizes: ids, replacement text and every tensor split back per image."""
    b = load_backend({"kind": "hf"}, str(cached_checkpoint(family)))
    many = b._preprocess_many(images)
    assert b._batch_preprocess
    for path, e in zip(images, many):
        one = b._preprocess(path)
        assert e.ids == one.ids and e.text == one.text
        assert e.tensors.keys() == one.tensors.keys()
        for k in one.tensors:
            assert torch.allclose(e.tensors[k].float(), one.tensors[k].float(), atol=1e-6)
        if family == "qwen":
            assert np.array_equal(e.rel_pos, one.rel_pos) and e.advance == one.advance


def test_segment_attention_equals_one_call_per_segment():
    """Packed segments (equal lengths back to back, equal lengths apart, odd ones out) in one
    batched call per length give the numbers of transformers' loop of one call per segment."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from icdrl.lvlm import hf

    torch.manual_seed(0)
    lengths = [16, 16, 16, 12, 16, 7, 12, 16]
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()])
    q, k, v = (torch.randn(1, 2, int(cu[-1]), 8) for _ in range(3))
    module = torch.nn.Module()  # no GQA; non-causal as the vision tower's attention
    hf._segments.inner = "sdpa"
    got, _ = hf._segments_attention(
        module,
        q,
        k,
        v,
        None,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=16,
        max_length_k=16,
        scaling=0.3,
        dropout=0.0,
        is_causal=False,
    )
    parts = zip(*(t.split(lengths, dim=2) for t in (q, k, v)))
    want = torch.cat(
        [
            sdpa_attention_forward(module, a, b, c, None, scaling=0.3, is_causal=False)[0]
            for a, b, c in parts
        ],
        dim=1,
    )
    assert got.shape == want.shape == (1, int(cu[-1]), 2, 8)
    assert torch.allclose(got, want, atol=1e-6)


def test_vision_encoder_runs_segments_batched_with_the_same_features(images, monkeypatch):
    """Mixed image sizes (so windows and images of several lengths): the vision tower's attention
    runs once per segment length instead of once per window or image, and its grid-only inputs
    are reused for the same grids, with the same features."""
    from transformers.modeling_utils import AttentionInterface

    from icdrl.lvlm import hf

    b = load_backend({"kind": "hf"}, str(cached_checkpoint("qwen")))
    assert b._vision and all(m.config._attn_implementation == "sdpa" for m in b._vision)
    calls = []

    def counted(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
        calls.append(len(set(torch.diff(cu_seq_lens_q).tolist())))
        return hf._segments_attention(
            module, query, key, value, attention_mask, cu_seq_lens_q=cu_seq_lens_q, **kwargs
        )

    monkeypatch.setitem(AttentionInterface._global_mapping, hf._SEGMENTS, counted)
    entries = b._preprocess_many(images)
    plain = [replace(e, tensors=dict(e.tensors)) for e in entries]
    again = [replace(e, tensors=dict(e.tensors)) for e in entries]
    b._encode_vision(entries)
    b._encode_vision(again)  # same grids: the grid-only inputs come from b._geometry
    assert len(b._geometry) == 1
    modules, b._vision = b._vision, []  # transformers' own loop over the segments, its own geometry
    b._encode_vision(plain)
    b._vision = modules
    depth = b.model.config.vision_config.depth
    assert len(calls) == 2 * depth and max(calls) > 1  # one call per layer; several segment lengths
    assert all(m.config._attn_implementation == "sdpa" for m in modules)  # restored
    for e, a, p in zip(entries, again, plain):
        assert e.features.shape == p.features.shape and torch.allclose(
            e.features, p.features, atol=1e-6
        )
        assert torch.equal(a.features, e.features)
    assert not load_backend({"kind": "hf"}, str(cached_checkpoint("llava")))._vision
    assert not load_backend(
        {"kind": "hf", "image_cache": "none"}, str(cached_checkpoint("qwen"))
    )._vision


@pytest.mark.parametrize("family", FAMILIES)
def test_image_processor_alone_once_the_layout_is_known(family, images, monkeypatch):
    """The whole processor runs on the first image of each layout only; every entry equals the
    one the processor gives for that image alone."""
    b = load_backend({"kind": "hf"}, str(cached_checkpoint(family)))
    whole = []
    many = b._preprocess_many
    monkeypatch.setattr(
        b, "_preprocess_many", lambda paths: whole.append(list(paths)) or many(paths)
    )
    first = b._preprocess_images(images[:2])  # two 64x64 images: one layout, both new
    got = b._preprocess_images(images)  # 32x128 and 96x48 bring new layouts
    assert b._image_only and whole[0] == images[:2]
    # the 64x64 ones were known; Qwen gives the two other sizes patch grids of their own,
    # LLaVA resizes every image to one size (one layout)
    assert whole[1:] == ([[images[2], images[4]]] if family == "qwen" else [])
    for path, e in zip(images[:2] + images, first + got):
        one = b._preprocess(path)
        assert e.ids == one.ids and e.text == one.text and _same(e.tensors, one.tensors)
        if family == "qwen":
            assert np.array_equal(e.rel_pos, one.rel_pos) and e.advance == one.advance
            assert np.array_equal(e.types, one.types)


def test_image_processor_alone_that_differs_switches_off(images):
    """An image processor whose output differs from the processor's (here: shifted pixels) is
    not used on its own."""
    b = load_backend({"kind": "hf"}, str(cached_checkpoint("qwen")))
    ip = b._image_processor

    def shifted(*args, **kwargs):
        out = ip(*args, **kwargs)
        out["pixel_values"] = out["pixel_values"] + 1.0
        return out

    b._image_processor = shifted
    got = b._preprocess_images(images[:3])
    assert not b._image_only
    got += b._preprocess_images(images[3:])
    for path, e in zip(images, got):
        one = b._preprocess(path)
        assert e.ids == one.ids and _same(e.tensors, one.tensors)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- cached greedy decoding


def _same_ids(fast: HFBackend, ref: HFBackend, prompts, n: int) -> list:
    """Token for token, the cached decoding's answers equal the reference path's (plain
    transformers: the processor on every prompt, ``model.generate``); near-ties would be allowed
    (the reference's two best logits within ``NEAR_TIE``), and none occurs on these models."""
    from icdrl.lvlm.hf import compare_greedy

    got = fast.generate_ids(prompts, n)
    items = ref._items(prompts, [None] * len(prompts))
    want, tied = ref._plain_tokens(items, n, gaps=True)
    assert want == ref.generate_ids(prompts, n)  # one batch or batch_size at a time
    mismatches, ties = compare_greedy(got, want, tied)
    assert mismatches == [] and ties == []
    assert got == want
    return got


def _fresh(family: str, **cfg) -> HFBackend:
    return load_backend({"kind": "hf", "batch_size": 4, **cfg}, str(cached_checkpoint(family)))


def test_compare_greedy_tells_near_ties_from_mismatches():
    from icdrl.lvlm.hf import compare_greedy, near_tie_tolerance

    fast = [(1, 2, 3), (1, 5, 9), (1, 5), (4,), (7, 8, 1)]
    ref = [(1, 2, 3), (1, 6, 9), (1, 6), (4, 2), (7, 8)]
    tied = [[False] * 3, [False, True, False], [False, False], [False, True], [False, False]]
    # row 1 first differs at a near-tie, row 2 where the reference's top two were apart; row 3
    # stopped a step early, at a near-tie; row 4 ran past the reference's end (no tie data there)
    assert compare_greedy(fast, ref, tied) == ([2, 4], [1, 3])
    assert compare_greedy(fast, fast, tied) == ([], [])
    assert near_tie_tolerance(torch.float32, 3.0) == 1e-5 and near_tie_tolerance(
        torch.float32, -40.0
    ) == pytest.approx(4e-5)
    assert (
        near_tie_tolerance(torch.bfloat16, 2.0) == 0.0625
        and near_tie_tolerance(torch.bfloat16, 24.0) == 24 / 128
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_reference_without_and_with_cached_prefixes(family, prompts, ex):
    """First call: nothing cached (the first batch runs whole prompts). Later calls: every prompt
    on the chat header or on demonstrations an earlier call stored (qwen; LLaVA has no prefix
    cache and decodes with the key/value cache alone)."""
    fast, ref = _fresh(family), backend(family, image_cache="none")
    _same_ids(fast, ref, prompts, 5)
    assert fast.stats["decode_steps"] > 0 and fast.fast_paths()["cached_greedy_decoding"]
    hits = fast.stats["prefix_hits"]
    longer = [([*demos, ex[5]], q) for demos, q in prompts if ex[5] not in demos and q is not ex[5]]
    _same_ids(fast, ref, longer, 5)  # each extends a prompt of the first call by one demonstration
    if family == "qwen":
        assert fast.stats["prefix_hits"] - hits == len(longer)
        assert all(
            fast._lookup_prefix(it).n_images >= len(d)
            for it, (d, _) in zip(fast._items(longer, [None] * 5), longer)
        )
    else:
        assert fast.stats["prefix_hits"] == 0 and not fast._prefix_kv
    assert fast.fast_paths()["cached_greedy_decoding"] and fast.stats["generate_near_ties"] == 0


def test_nested_prompts_run_on_the_longest_ones_prefixes(ex):
    """A query's 1..4-shot prompts in one call: the 4-shot one runs first and the others on its
    stored demonstration prefixes: one forward over each prompt's own tail."""
    fast, ref = _fresh("qwen", batch_size=8), backend("qwen", image_cache="none")
    fast.generate_ids([([], ex[0])], 2)  # header cached, checks of whole prompts done
    nested = [(ex[1 : 1 + k], ex[0]) for k in range(1, 5)] + [(ex[:k], ex[5]) for k in range(1, 5)]
    before = dict(fast.stats)
    _same_ids(fast, ref, nested, 4)
    assert fast.stats["prefix_hits"] - before["prefix_hits"] == 8
    # two waves: the two 4-shot prompts (on the header), then the six others on their prefixes,
    # plus the plain generate of the check of the first batch on cached prefixes
    assert fast.stats["forward_batches"] - before["forward_batches"] == 2 + 1


def test_mixed_batches_rows_with_and_without_cached_prefixes(ex, prompts, monkeypatch):
    """Rows on demonstration prefixes, on the chat header only and (forced) on none, in one batch."""
    fast, ref = _fresh("qwen", batch_size=8), backend("qwen", image_cache="none")
    fast.generate_ids([([ex[1]], ex[0]), ([ex[3]], ex[2])], 3)
    lookup = fast._lookup_prefix
    calls = []

    def every_third_none(item):
        calls.append(item)
        return None if len(calls) % 3 == 0 else lookup(item)

    monkeypatch.setattr(fast, "_lookup_prefix", every_third_none)
    seen = []
    stack = fast._stack_prefixes
    monkeypatch.setattr(
        fast,
        "_stack_prefixes",
        lambda pks, room=None: seen.append([pk and pk.n_images for pk in pks]) or stack(pks, room),
    )
    mixed = [([ex[1], ex[4]], ex[0]), ([ex[3], ex[5]], ex[2]), *prompts]
    _same_ids(fast, ref, mixed, 4)
    rows = [r for batch in seen for r in batch]
    assert None in rows and 0 in rows and any(r and r >= 1 for r in rows)
    assert any(None in b and any(b) for b in seen)  # one batch holds rows with and without a prefix


def _stopping_token(b: HFBackend, prompts, n: int) -> int:
    """A token that the greedy answers reach at different steps (and some never): as an end
    token it makes rows stop at different lengths."""
    free = b.generate_ids(prompts, n)
    best = None
    for t in sorted({t for row in free for t in row}):
        first = [row.index(t) if t in row else None for row in free]
        steps = {f for f in first if f is not None}
        if len(steps) >= 2 and None in first:
            best = t
            break
    assert best is not None, "no token reached at several steps; pick other prompts"
    return best


def _diverse_pair(family: str, **cfg) -> tuple[HFBackend, HFBackend]:
    """(cached, reference) backends on one model whose greedy answers vary from row to row (the
    tiny random Qwen answers every prompt with one repeated token: its language model's
    matrices are redrawn with a larger spread, seeded)."""
    fast = _fresh(family, **cfg)
    if family == "qwen":
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in fast.model.model.language_model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return fast, HFBackend(fast.model, fast.processor, batch_size=4, image_cache="none")


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_stop_at_their_own_end_and_at_max_new_tokens(family, prompts, ex):
    fast, ref = _diverse_pair(family)
    many = prompts + [([ex[4]], ex[3]), ([ex[0], ex[2]], ex[5])]
    end = _stopping_token(ref, many, 6)
    fast.model.generation_config.eos_token_id = end  # one model for both
    got = _same_ids(fast, ref, many, 6)
    lengths = {len(t) for t in got}
    assert len(lengths) >= 3 and 6 in lengths  # stopped at different steps, some at max_new_tokens
    assert all(t[-1] == end for t in got if len(t) < 6) and all(end not in t[:-1] for t in got)
    for n in (1, 2):  # max_new_tokens reached by every row
        assert all(len(t) <= n for t in _same_ids(fast, ref, many, n))
    raws = [g.raw for g in fast.generate(many, 6)]
    assert raws == [g.raw for g in ref.generate(many, 6)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_decode_together_and_equal_the_reference(family, prompts, ex, monkeypatch):
    """Batches after the checked first one of their kind are decoded together (of this wave and
    later ones, first-step caches of different widths in one block): the answers still equal
    the reference path's, rows stopping at different steps and at max_new_tokens."""
    from icdrl.lvlm import hf

    fast, ref = _diverse_pair(family)
    fast.batch_size = ref.batch_size = 2
    many = prompts + [([ex[4]], ex[3]), ([ex[0], ex[2]], ex[5]), ([ex[2], ex[3], ex[1]], ex[0])]
    many += [(d[::-1], q) for d, q in prompts if len(d) > 1]
    end = _stopping_token(ref, many, 6)
    fast.model.generation_config.eos_token_id = end
    joined, rows = [], []  # per joint decoding: the batches' cache widths, the rows
    of_block = hf._Decoding.of_block.__func__

    def spy(cls, states, block):
        joined.append([d.mask.shape[1] for d in states])
        rows.append(block.used)
        assert block.used <= block.rows and max(joined[-1]) <= block.width
        return of_block(cls, states, block)

    monkeypatch.setattr(hf._Decoding, "of_block", classmethod(spy))
    for n in (6, 2):
        got = _same_ids(fast, ref, many, n)
    assert joined and any(len(set(widths)) > 1 for widths in joined)  # different widths joined
    assert max(len(w) for w in joined) >= 2
    assert max(rows) <= 2 * hf._ROWS_PER_BATCH * fast.batch_size  # twice what a batch may hold
    lengths = {len(t) for t in _same_ids(fast, ref, many, 6)}
    assert len(lengths) >= 2 and 6 in lengths
    assert all(len(t) <= 2 for t in got)


def _kv(rows, width, start):
    """Per layer (keys, values) [rows, 2 heads, width, 3], distinct numbers per layer and call."""
    return [
        (
            torch.arange(rows * 2 * width * 3, dtype=torch.float32).reshape(rows, 2, width, 3)
            + start
            + 1000 * i,
            -torch.ones(rows, 2, width, 3) * (start + i),
        )
        for i in range(2)
    ]


def test_kv_block_holds_batches_right_aligned_and_decodes_in_place():
    from icdrl.lvlm.hf_patches import KVBlock

    block = KVBlock(2, rows=4, width=5, room=2)
    block.k = [torch.full((4, 2, 7, 3), float("nan")) for _ in range(2)]  # what new_empty may hold
    block.v = [torch.full((4, 2, 7, 3), float("nan")) for _ in range(2)]
    da, db = _kv(2, 3, 0), _kv(1, 5, 500)
    for data in (da, db):
        assert block.fits(len(data[0][0]), data[0][0].shape[2])
        cache = block.take(data[0][0].shape[2])
        for layer, (k, v) in zip(cache.layers, data):
            got_k, _ = layer.update(k[:, :, :1], v[:, :, :1])  # as a first step: prefix, tail
            got_k, got_v = layer.update(k[:, :, 1:], v[:, :, 1:])
            assert torch.equal(got_k, k) and torch.equal(got_v, v)
        block.close()
    assert block.used == 3 and not block.fits(2, 3) and not block.fits(1, 6) and block.fits(1, 5)
    merged = block.cache()
    for i, layer in enumerate(merged.layers):
        assert layer.keys.shape == (3, 2, 5, 3)
        assert torch.equal(layer.keys[:2, :, 2:], da[i][0]) and torch.equal(
            layer.values[2:], db[i][1]
        )
        assert torch.equal(layer.keys[:2, :, :2], torch.zeros(2, 2, 2, 3))  # left of a batch: zeros
        assert torch.equal(layer.values[:2, :, :2], torch.zeros(2, 2, 2, 3))
        assert layer.keys.data_ptr() == block.k[i].data_ptr()  # the block's buffer: no copy
    k, v = merged.layers[0].update(torch.ones(3, 2, 1, 3), torch.ones(3, 2, 1, 3))
    assert k.shape == (3, 2, 6, 3) and torch.equal(block.k[0][:3, :, 5], torch.ones(3, 2, 3))
    with pytest.raises(ValueError, match="columns"):
        block.take(6)


def test_kv_block_rows_and_room_are_enforced_and_a_given_up_batch_frees_its_rows():
    from icdrl.lvlm.hf_patches import KVBlock

    block = KVBlock(1, rows=2, width=4, room=1)
    ((k, v),) = _kv(1, 4, 0)[:1]
    cache = block.take(4)
    cache.layers[0].update(k, v)
    block.close(keep=False)  # e.g. the batch's forward failed
    assert block.used == 0
    cache = block.take(2)
    cache.layers[0].update(k[:, :, :2], v[:, :, :2])
    cache.layers[0].update(k[:, :, :1], v[:, :, :1])  # its room
    with pytest.raises(RuntimeError, match="room"):
        cache.layers[0].update(k[:, :, :1], v[:, :, :1])
    block.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.layers[0].__class__(1, home=(block, 0)).update(k, v)
    ((k3, v3),) = _kv(3, 4, 0)[:1]
    cache = block.take(4)
    with pytest.raises(ValueError, match="rows"):
        cache.layers[0].update(k3, v3)


def test_roomy_layer_reserve_is_a_first_update_written_in_place():
    from icdrl.lvlm.hf_patches import roomy_cache

    ((k, v),) = _kv(2, 3, 0)[:1]
    layer = roomy_cache(1, 4).layers[0]
    dk, dv = layer.reserve(2, k[:1], v[:1], 3)  # rows from the argument, not from the example
    dk.copy_(k), dv.copy_(v)
    assert layer.n == 3 and torch.equal(layer.keys, k) and layer._k.shape == (2, 2, 7, 3)
    got, _ = layer.update(-k[:, :, :1], -v[:, :, :1])
    assert torch.equal(got[:, :, :3], k) and torch.equal(got[:, :, 3], -k[:, :, 0])
    with pytest.raises(RuntimeError, match="already"):
        layer.reserve(2, k, v, 1)


def _gqa_inputs(rows, queries, keys, seed=0):
    """Queries [rows, 4 heads, queries, 8], keys/values [rows, 2 kv heads, keys, 8] (strided,
    as a roomy cache's views are) and a boolean causal mask with left padding in some rows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, queries, 4, 8, generator=g).transpose(1, 2)
    k, v = (torch.randn(rows, 2, keys + 3, 8, generator=g)[:, :, :keys] for _ in range(2))
    past = keys - queries
    mask = (torch.arange(keys)[None, :] <= (torch.arange(queries) + past)[:, None])[None, None]
    mask = mask.expand(rows, 1, -1, -1).clone()
    mask[::2, :, :, :2] = False
    return q, k, v, mask


class _Attn(torch.nn.Module):
    num_key_value_groups, is_causal = 2, True


def test_shared_kv_attention_is_transformers_sdpa_bit_for_bit_for_several_queries():
    """Several queries with a mask (a generation's first step): enable_gqa's numbers are
    repeat_kv's exactly; without a mask, or without shared heads, it is transformers' own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from icdrl.lvlm.hf_patches import shared_kv_attention

    q, k, v, mask = _gqa_inputs(5, 7, 11)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.3)
    got, _ = shared_kv_attention(_Attn(), q, k, v, mask, scaling=0.3)
    assert got.shape == ref.shape == (5, 7, 4, 8) and torch.equal(got, ref)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v[:, :, :7], None, scaling=0.3)
    got, _ = shared_kv_attention(_Attn(), q, k, v[:, :, :7], None, scaling=0.3)
    assert torch.equal(got, ref)  # no mask: transformers' causal logic, unchanged
    bias = torch.randn(5, 1, 7, 11)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.3, position_bias=bias)
    got, _ = shared_kv_attention(_Attn(), q, k, v, mask, scaling=0.3, position_bias=bias)
    assert torch.equal(got, ref)  # a term it does not add: transformers' own


def test_shared_kv_attention_for_one_query_agrees_to_float_rounding():
    """One query per row (a decoding step), where transformers folds the query heads into rows:
    the same attention to float rounding, and not some other one (a mask ignored would show)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from icdrl.lvlm.hf_patches import shared_kv_attention

    q, k, v, mask = _gqa_inputs(6, 1, 9, seed=1)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.35)
    got, _ = shared_kv_attention(_Attn(), q, k, v, mask, scaling=0.35)
    assert got.shape == ref.shape == (6, 1, 4, 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    unmasked, _ = shared_kv_attention(_Attn(), q, k, v, torch.ones_like(mask), scaling=0.35)
    assert (unmasked[::2] - ref[::2]).abs().max() > 1e-3


def test_shared_kv_heads_switch_the_decoder_on_the_cpu_only():
    """The tiny Qwen2.5-VL (4 query heads, 2 key/value heads, sdpa) attends by the shared-heads
    function within the block and by its own outside; the vision tower is not touched."""
    from icdrl.lvlm import hf_patches

    fast = _fresh("qwen")
    mods = hf_patches.shared_kv_modules(fast.model)
    assert mods and mods == fast._shared_kv and fast.fast_paths()["decoding_shared_kv_heads"]
    assert all(m.num_key_value_groups == 2 for m in mods)
    vision = hf_patches.vision_modules(fast.model)
    assert vision and not set(vision) & set(mods)
    with hf_patches.shared_kv_heads(mods):
        assert {m.config._attn_implementation for m in mods} == {hf_patches.SHARED_KV}
        assert {m.config._attn_implementation for m in vision} == {"sdpa"}
    assert {m.config._attn_implementation for m in mods} == {"sdpa"}
    assert hf_patches.shared_kv_modules(torch.nn.Linear(2, 2)) == []
    ref = backend("qwen", image_cache="none")
    assert ref._shared_kv == [] and not ref.fast_paths()["decoding_shared_kv_heads"]
    assert hf_patches.shared_kv_modules(fast.model.to("meta")) == []  # not on the CPU


@pytest.mark.parametrize("insert", ["first", "last"])
def test_cached_decoding_on_beam_search_like_steps(ex, insert):
    """Step 1 then step 2 prompts (the new demonstration first or last), as scoring and beam
    search build them; insert last reads the step-1 prefixes, insert first the chat header."""
    fast, ref = _fresh("qwen", batch_size=4), backend("qwen", image_cache="none")
    step1, step2, step3 = _steps(ex, insert)
    _same_ids(fast, ref, step1, 4)
    read = []  # per step, the demonstrations in each row's cached prefix
    for step in (step2, step3):
        items = fast._items(step, [None] * len(step))
        read.append(
            [fast.prefixes.lookup(it.ids, it.images, fast._boundaries(it)).n_images for it in items]
        )
        _same_ids(fast, ref, step, 4)
    if insert == "last":  # (b, c) reads (b), ((b, c), d) reads (b, c)
        assert read == [[1] * len(step2), [2] * len(step3)]
    else:  # (c, b) reads (c), which step 1 stored
        assert all(n >= 1 for n in read[0] + read[1])


def test_a_real_mismatch_switches_cached_decoding_off(prompts, monkeypatch, caplog):
    """A corrupted key/value cache (values doubled) makes the cached answers differ from
    model.generate's: the first check says so, and this and every later batch come from
    model.generate."""
    import logging

    from icdrl.lvlm import hf_patches

    class Corrupt(hf_patches.RoomyLayer):
        def update(self, k, v, *a, **kw):
            return super().update(k, 2 * v, *a, **kw)

    monkeypatch.setattr(hf_patches, "RoomyLayer", Corrupt)
    fast, ref = _diverse_pair("qwen")
    with caplog.at_level(logging.WARNING, logger="icdrl.lvlm.hf"):
        got = fast.generate_ids(prompts, 5)
    assert "cached greedy decoding differs from model.generate" in caplog.text
    assert not fast.fast_paths()["cached_greedy_decoding"]
    assert got == ref.generate_ids(prompts, 5) == fast.generate_ids(prompts, 5)


def test_a_near_tie_does_not_switch_cached_decoding_off(prompts, monkeypatch):
    """Differences whose reference logits are (here: declared) tied are counted, not mismatches."""
    from icdrl.lvlm import hf, hf_patches

    class Corrupt(hf_patches.RoomyLayer):
        def update(self, k, v, *a, **kw):
            return super().update(k, 2 * v, *a, **kw)

    monkeypatch.setattr(hf_patches, "RoomyLayer", Corrupt)
    monkeypatch.setitem(hf.NEAR_TIE, torch.float32, (1e9, 0.0))
    fast, ref = _diverse_pair("qwen")
    assert fast.generate_ids(prompts, 5) != ref.generate_ids(prompts, 5)  # the corruption shows
    assert fast.stats["generate_near_ties"] > 0 and fast.fast_paths()["cached_greedy_decoding"]


def test_bf16_fast_paths_stay_on_and_agree_with_the_reference(prompts, ex):
    """Tiny Qwen2.5-VL in bfloat16 on the CPU: every fast path stays on; scores agree with the
    reference path within bf16 rounding, generated answers token for token except at near-ties
    within bf16's tolerance."""
    from icdrl.lvlm.hf import compare_greedy

    fast = _fresh("qwen", dtype="bfloat16")
    ref = _fresh("qwen", dtype="bfloat16", image_cache="none")
    f32 = backend("qwen")
    assert fast.dtype == torch.bfloat16
    calls = [prompts, [(ex[1 : 1 + k], ex[0]) for k in range(1, 5)]]
    for pr in calls:
        ans = [q.answer for _, q in pr]
        got = [s.mean_logprob for s in fast.answer_logprobs(pr, ans)]
        want = [s.mean_logprob for s in ref.answer_logprobs(pr, ans)]
        assert got == pytest.approx(want, abs=0.06)
        assert got == pytest.approx([s.mean_logprob for s in f32.answer_logprobs(pr, ans)], abs=0.1)
    # generation on a model whose answers vary (the stock tiny one repeats one token)
    gfast, gref = _diverse_pair("qwen", dtype="bfloat16")
    for pr in calls:
        toks = gfast.generate_ids(pr, 5)
        plain, tied = gref._plain_tokens(gref._items(pr, [None] * len(pr)), 5, gaps=True)
        mismatches, _ties = compare_greedy(toks, plain, tied)
        assert mismatches == [] and len(set(toks)) > 1
    for b in (fast, gfast):
        assert b.stats["prefix_hits"] > 0
        off = [k for k, on in b.fast_paths().items() if not on]
        assert off == []
    assert gfast.stats["decode_steps"] > 0


# ---------------------------------------------------------------------- demonstrations without images


def _no_image_prompts(ex):
    """The no_images ablation's prompts (icdrl.ablations.strip_image), some after the same prompts with
    images, so that the skeletons, the image cache and the prefix cache have seen both shapes."""
    from icdrl.ablations import strip_image

    plain = [([ex[1], ex[2]], ex[0]), ([ex[3], ex[1], ex[4]], ex[5]), ([ex[2]], ex[3])]
    bare = [([strip_image(d) for d in demos], q) for demos, q in plain]
    mixed = [([ex[1], strip_image(ex[2])], ex[0]), ([strip_image(ex[3]), ex[1], ex[4]], ex[5])]
    return plain, bare + mixed


@pytest.mark.parametrize("family", FAMILIES)
def test_demonstrations_without_images_equal_the_reference_path(family, ex):
    """A demonstration with an empty image is its text alone: the chat text has one image placeholder
    fewer, and every fast path (skeletons, image cache, prefix cache) gives the numbers and answers of
    the reference path (image_cache: none), also right after the same prompts with images."""
    plain, bare = _no_image_prompts(ex)
    ref = load_backend(
        {"kind": "hf", "batch_size": 1, "image_cache": "none"}, str(cached_checkpoint(family))
    )
    answers = ["red", "fire hydrant", "teal", "red", "fire hydrant"]
    for pr in bare:
        n_img = sum(1 for d in pr[0] if d.image) + 1
        text = ref.render(pr)
        assert text.count(ref.image_token) == n_img
        assert text == ref.processor.apply_chat_template(
            ref.messages(pr), tokenize=False, add_generation_prompt=True
        )
        assert all(d.question in text for d in pr[0])
    want = sums(ref.answer_logprobs(bare, answers))
    want_gen = [g.raw for g in ref.generate(bare, max_new_tokens=4)]
    # a no-image prompt is not its image version: the ablation changes what the model sees
    assert want[:3] != pytest.approx(sums(ref.answer_logprobs(plain, answers[:3])), abs=TOL)
    for mode in ("features", "pixels"):
        b = load_backend(
            {"kind": "hf", "batch_size": 3, "image_cache": mode}, str(cached_checkpoint(family))
        )
        for _ in range(
            3
        ):  # warm every cache with the image versions first, past the skeleton checks
            b.answer_logprobs(plain, answers[:3])
            b.generate(plain, max_new_tokens=4)
        for _ in range(2):  # past the skeleton checks; the second round runs on cached prefixes
            assert sums(b.answer_logprobs(bare, answers)) == pytest.approx(want, abs=1e-5)
            assert [g.raw for g in b.generate(bare, max_new_tokens=4)] == want_gen
        for pr, a in zip(bare, answers):
            assert b.encode(pr, a) == ref.encode(pr, a)
    if family == "qwen":
        assert b.stats["prefix_hits"] > 0  # the prefix cache did serve them


def test_query_needs_its_image(ex):
    from icdrl.ablations import strip_image
    from icdrl.lvlm.prompt import build_messages

    with pytest.raises(ValueError, match="query 0 has no image"):
        build_messages([ex[1]], strip_image(ex[0]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlps_in_place_give_their_own_forward_bit_for_bit(family, dtype):
    """Every gated SiLU MLP of the tiny models (Qwen2.5-VL: vision tower and decoder) runs in
    place within the block, with its own forward's numbers bit for bit, and its own forward
    again after it and wherever autograd records."""
    from icdrl.lvlm import hf_patches

    model = _fresh(family).model.to(dtype)
    mlps = hf_patches.gated_mlps(model)
    names = {type(m).__name__ for m in mlps}
    layers = model.config.text_config.num_hidden_layers
    vision = model.config.vision_config.depth if family == "qwen" else 0
    assert len(mlps) == layers + vision
    assert names == ({"Qwen2_5_VLMLP", "Qwen2MLP"} if family == "qwen" else {"LlamaMLP"})
    g = torch.Generator().manual_seed(1)
    for m in mlps:
        x = torch.randn(3, 11, m.gate_proj.in_features, generator=g).to(dtype)
        with torch.inference_mode():
            want = m(x)
            with hf_patches.mlps_in_place(mlps):
                assert "forward" in vars(m)
                got = m(x)
            assert "forward" not in vars(m)
        assert torch.equal(got, want) and got.dtype == dtype
    m = mlps[-1]
    with hf_patches.mlps_in_place([m]):
        x = torch.randn(2, 3, m.gate_proj.in_features).to(dtype).requires_grad_()
        m(x).sum().backward()  # the module's own forward: in-place steps would break this
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_gated_mlps_leave_out_other_formulas_and_wrapped_forwards():
    """A module laid out like a gated MLP whose forward computes something else fails the
    random-input check and is left out; so is one whose forward was replaced (accelerate's
    hooks), and anything that is not a SiLU gated MLP."""
    from icdrl.lvlm import hf_patches

    class AddMLP(torch.nn.Module):  # down(silu(gate) + up): not the product
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6)
            self.down_proj, self.act_fn = torch.nn.Linear(6, 4), torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    class GatedMLP(AddMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class GeluMLP(GatedMLP):
        def __init__(self):
            super().__init__()
            self.act_fn = torch.nn.GELU()

    wrapped = GatedMLP()
    wrapped.forward = wrapped.forward
    model = torch.nn.ModuleList([AddMLP(), GatedMLP(), GeluMLP(), wrapped])
    assert hf_patches.gated_mlps(model) == [model[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_halves_is_transformers_rope_bit_for_bit(dtype):
    """Qwen2.5-VL's decoder and vision rope functions are replaced within the block (module
    globals, restored after it), with transformers' numbers bit for bit on shapes other than
    the probe's; a stock function computing something else is not replaced."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as M

    from icdrl.lvlm import hf_patches

    model = _fresh("qwen").model
    funcs = hf_patches.rope_functions(model, dtype)
    assert [name for _, name in funcs] == ["apply_rotary_pos_emb", "apply_rotary_pos_emb_vision"]
    text, vision = M.apply_rotary_pos_emb, M.apply_rotary_pos_emb_vision
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 9, 6, 32, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(2, 9, 3, 32, generator=g).to(dtype).transpose(1, 2)
    cos, sin = (torch.randn(2, 9, 32, generator=g).to(dtype) for _ in range(2))
    vq, vk = (torch.randn(40, 4, 16, generator=g).to(dtype) for _ in range(2))
    vcos, vsin = (torch.randn(40, 16, generator=g) for _ in range(2))
    want = [*text(q, k, cos, sin), *vision(vq, vk, vcos, vsin)]
    with hf_patches.rope_in_halves(funcs):
        assert M.apply_rotary_pos_emb is not text and M.apply_rotary_pos_emb_vision is not vision
        got = [
            *M.apply_rotary_pos_emb(q, k, cos, sin),
            *M.apply_rotary_pos_emb_vision(vq, vk, vcos, vsin),
        ]
    assert M.apply_rotary_pos_emb is text and M.apply_rotary_pos_emb_vision is vision
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    assert not hf_patches.rope_functions(_fresh("llava").model)  # its modeling module has none


def test_rope_that_differs_is_not_replaced(monkeypatch):
    """A decoder rope computing something else (``rotate_half`` the other way round) fails the
    check: only the vision one is replaced."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as M

    from icdrl.lvlm import hf_patches

    def other(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        flip = lambda x: torch.cat((x[..., x.shape[-1] // 2 :], -x[..., : x.shape[-1] // 2]), -1)  # noqa: E731
        return q * cos + flip(q) * sin, k * cos + flip(k) * sin

    monkeypatch.setattr(M, "apply_rotary_pos_emb", other)
    funcs = hf_patches.rope_functions(_fresh("qwen").model)
    assert [name for _, name in funcs] == ["apply_rotary_pos_emb_vision"]


def test_in_place_kernels_leave_scores_features_and_answers_bit_for_bit(prompts, ex):
    """The backend with the in-place MLPs and rope on gives the same vision features, scores
    and generated ids, bit for bit, as the same backend with them off."""
    on, _ = _diverse_pair("qwen")
    off = HFBackend(on.model, on.processor, batch_size=4)
    assert on.fast_paths()["mlps_in_place"] and on.fast_paths()["rope_in_halves"]
    off._mlps, off._ropes = [], []
    calls = [prompts, [(ex[1 : 1 + k], ex[0]) for k in range(1, 5)]]
    for pr in calls:
        ans = [q.answer for _, q in pr]
        assert sums(on.answer_logprobs(pr, ans)) == sums(off.answer_logprobs(pr, ans))
        assert on.generate_ids(pr, 5) == off.generate_ids(pr, 5)
    feats = [(p, e.features) for p, e in on._cache.items()]
    assert feats and all(torch.equal(f, off._cache[p].features) for p, f in feats)

"""The embedded LVLM's training recipe (pure Python; no model)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from icdrl.data import Example
from icdrl.lvlm import embedded_recipe as R


def ex(i, q, a, image=None):
    return Example(
        id=i,
        image=image or f"img{i}.png",
        question=q,
        answers=(a,),
        answer=a,
        image_id=str(image or i),
    )


def test_template_masks_colour_and_shape_words():
    assert R.question_template("is there a red shape?") == "is there a <C> shape?"
    assert R.question_template("what color is the  Triangle?") == "what color is the <S>?"
    assert R.question_template("what is the teal shape?") == "what is the <C> shape?"
    # "shape" itself is not a shape word
    assert R.question_template("what shape is in the image?") == "what shape is in the image?"


def test_answer_kind():
    assert R.answer_kind("blue") == "colour"
    assert R.answer_kind("circle") == "shape"
    assert R.answer_kind("yes") == "yesno" and R.answer_kind("no") == "yesno"


def test_match_levels_and_noisy_or():
    q = ex(0, "is there a red shape?", "no")
    same_t = ex(1, "is there a blue shape?", "yes")
    same_k = ex(2, "is a circle present?", "no")
    other = ex(3, "what color is the shape?", "red")
    assert [R.match_level(d, q) for d in (same_t, same_k, other)] == ["exact", "kind", "none"]
    p = R.short_form_prob
    assert p([], q, 0.8, 0.2) == 0.0
    assert p([other], q, 0.8, 0.2) == 0.0
    assert p([same_t], q, 0.8, 0.2) == pytest.approx(0.8)
    assert p([same_k], q, 0.8, 0.2) == pytest.approx(0.2)
    assert p([same_t, same_t], q, 0.8, 0.2) == pytest.approx(0.96)
    assert p([same_k, same_t, other], q, 0.8, 0.2) == pytest.approx(1 - 0.8 * 0.2)
    # more demonstrations never lower the probability (noisy-OR is monotone)
    assert p([same_k, same_k], q, 0.8, 0.2) > p([same_k], q, 0.8, 0.2)


def _toy_train():
    out, i = [], 0
    for img in range(40):
        colour = R.COLOURS[img % len(R.COLOURS)]
        shape = R.SHAPES[img % len(R.SHAPES)]
        other = R.COLOURS[(img + 3) % len(R.COLOURS)]
        for q, a in [
            ("what color is the shape?", colour),
            (f"what color is the {shape}?", colour),
            ("what shape is in the image?", shape),
            (f"is there a {colour} shape?", "yes"),
            (f"is there a {other} shape?", "no"),
            (f"is there a {other} shape?", "no"),
            (f"is there not a {other} shape?", "yes"),
            (f"is a {shape} present?", "yes"),
        ]:
            out.append(ex(i, q, a, image=f"im{img}.png"))
            i += 1
    return out


def _sample(rng, index, **kw):
    args = dict(
        kind_weights={"colour": 1.0, "shape": 1.0, "yesno": 1.5},
        max_demos=4,
        similar_share=0.5,
        cue_exact=0.8,
        cue_kind=0.2,
    )
    args.update(kw)
    return R.sample_item(rng, index, **args)


def test_sample_item_invariants():
    index = R.RecipeIndex(_toy_train())
    rng = random.Random(0)
    for _ in range(400):
        it = _sample(rng, index)
        assert 0 <= len(it.demos) <= 4
        assert all(d.image != it.query.image for d in it.demos), (
            "a demonstration shows the query's image"
        )
        assert it.p_short == pytest.approx(R.short_form_prob(it.demos, it.query, 0.8, 0.2))
        assert it.target == (it.query.answer if it.short else f"the answer is {it.query.answer}")
        if not it.demos:
            assert not it.short


def test_warmup_items_are_zero_shot_and_never_negated():
    index = R.RecipeIndex(_toy_train())
    rng = random.Random(1)
    items = [_sample(rng, index, warmup=True) for _ in range(200)]
    assert all(not it.demos and not it.short for it in items)
    assert {R.answer_kind(it.query.answer) for it in items} == {"colour", "shape", "yesno"}
    assert not any(R.is_negated(it.query.question) for it in items)
    assert any(R.is_negated(it.query.question) for it in (_sample(rng, index) for _ in range(200)))


def test_negation_detection():
    assert R.is_negated("is there not a red shape?") and R.is_negated("is no circle present?")
    assert not R.is_negated("is there a red shape?") and not R.is_negated(
        "is a notable shape here?"
    )


def test_yesno_queries_and_same_template_demos_are_balanced():
    """The text prior of the toy data is "no" 2:1 for "is there a <C> shape?"; sampling removes it."""
    index = R.RecipeIndex(_toy_train())
    rng = random.Random(2)
    q_answers, demo_answers = Counter(), Counter()
    for _ in range(3000):
        it = _sample(rng, index, kind_weights={"yesno": 1.0}, similar_share=1.0, n_demos=2)
        if R.question_template(it.query.question) == "is there a <C> shape?":
            q_answers[it.query.answer] += 1
            for d in it.demos:
                if R.match_level(d, it.query) == "exact":
                    demo_answers[(it.query.answer, d.answer)] += 1
    assert abs(q_answers["yes"] / sum(q_answers.values()) - 0.5) < 0.06
    # a same-template demonstration's answer is independent of the query's
    for qa in ("yes", "no"):
        n = demo_answers[(qa, "yes")] + demo_answers[(qa, "no")]
        assert n > 50 and abs(demo_answers[(qa, "yes")] / n - 0.5) < 0.12


def test_unbalanced_sampling_keeps_the_prior():
    index = R.RecipeIndex(_toy_train())
    rng = random.Random(3)
    c = Counter()
    for _ in range(2000):
        it = _sample(
            rng,
            index,
            kind_weights={"yesno": 1.0},
            balance_yesno=False,
            balance_yesno_queries=False,
        )
        if R.question_template(it.query.question) == "is there a <C> shape?":
            c[it.query.answer] += 1
    assert c["no"] / sum(c.values()) > 0.6


def test_query_prior_kept_while_same_template_demos_stay_balanced():
    """The default recipe: queries carry the split's text prior, demonstrations' answers do not."""
    index = R.RecipeIndex(_toy_train())
    rng = random.Random(4)
    q_answers, demo_answers = Counter(), Counter()
    for _ in range(3000):
        it = _sample(
            rng,
            index,
            kind_weights={"yesno": 1.0},
            similar_share=1.0,
            n_demos=2,
            balance_yesno=True,
            balance_yesno_queries=False,
        )
        if R.question_template(it.query.question) == "is there a <C> shape?":
            q_answers[it.query.answer] += 1
            for d in it.demos:
                if R.match_level(d, it.query) == "exact":
                    demo_answers[d.answer] += 1
    assert q_answers["no"] / sum(q_answers.values()) > 0.6
    assert abs(demo_answers["yes"] / sum(demo_answers.values()) - 0.5) < 0.06


def test_similar_mode_gives_template_matches_and_random_mode_rarely():
    index = R.RecipeIndex(_toy_train())
    rng = random.Random(4)

    def exact_share(similar_share):
        hits = tot = 0
        for _ in range(600):
            it = _sample(rng, index, similar_share=similar_share, n_demos=1)
            hits += R.match_level(it.demos[0], it.query) == "exact"
            tot += 1
        return hits / tot

    assert exact_share(1.0) > 0.4
    assert exact_share(0.0) < 0.3


def test_sampling_is_deterministic_given_the_seed():
    index = R.RecipeIndex(_toy_train())
    a = [_sample(random.Random(7), index) for _ in range(1)] + [
        _sample(r, index) for r in [random.Random(9)] for _ in range(20)
    ]
    b = [_sample(random.Random(7), index) for _ in range(1)] + [
        _sample(r, index) for r in [random.Random(9)] for _ in range(20)
    ]
    assert a == b


def test_empty_training_split_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        R.RecipeIndex([])

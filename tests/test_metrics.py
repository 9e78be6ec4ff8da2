"""Official VQA accuracy: the evaluator's documented normalisation and leave-one-out averaging."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icdrl.metrics import normalize_answer, vqa_accuracy, vqa_correct


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number words become digits, case folded
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only none/zero..ten are mapped
        ("a dog", "dog"),  # articles dropped
        ("The Red Bus", "red bus"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("don't", "don't"),
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("yall", "y'all"),
        ("1.5", "1.5"),  # a period before a digit stays (decimal)
        ("yes.", "yes"),  # other periods go
        ("5.", "5"),
        ("mr. smith", "mr smith"),
        ("1,000", "1000"),  # digit,digit: every punctuation mark is deleted
        ("red, white", "red white"),  # mark next to a space: deleted
        ("t-shirt", "t shirt"),  # mark not next to a space: becomes a space
        ("yes!", "yes"),  # "!" not next to a space, becomes a trailing space, then split away
        ("  Yes\n", "yes"),
        ("left\tside", "left side"),
        ("(dog)", "dog"),
        ("10:30", "10:30"),  # ":" is not in the official list
        ("it's", "it's"),
        ("", ""),
    ],
)
def test_normalize_answer_documented_cases(raw, expected):
    assert normalize_answer(raw) == expected


def test_official_examples_match_after_normalisation():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("2", ["two"]) == 1.0
    assert vqa_accuracy("a dog", ["dog"]) == 1.0
    assert vqa_accuracy("don't", ["dont"]) == 1.0
    assert vqa_accuracy("1.5", ["15"]) == 0.0  # the decimal point is kept
    assert vqa_accuracy("1.5", ["1.5"]) == 1.0
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


@pytest.mark.parametrize(
    "matches, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)],
)
def test_ten_answers_leave_one_out(matches, expected):
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_is_not_plain_min_of_matches_over_3():
    # plain min(#matches/3, 1) would give 1.0 for 3 matches; the official average gives 0.9
    answers = ["blue"] * 3 + ["navy"] * 7
    assert vqa_accuracy("blue", answers) == pytest.approx(0.9)
    assert vqa_accuracy("navy", answers) == 1.0


def test_single_reference_is_exact_match_after_normalisation():
    assert vqa_accuracy("Red.", ["red"]) == 1.0
    assert vqa_accuracy("red", ["red"]) == 1.0
    assert vqa_accuracy("redish", ["red"]) == 0.0
    assert vqa_accuracy("dark red", ["red"]) == 0.0


def test_references_are_normalised_too():
    # references that differ are normalised under both metrics; identical ones only in "normalised"
    assert vqa_accuracy("2", ["Two"] * 3 + ["three"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dog", ["a dog"] * 10, "normalised") == 1.0
    assert vqa_accuracy("dog", ["a dog"] * 10) == 0.0


# Hand-worked cases of GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
# (master): prediction and references are stripped; only if the stripped references are not all
# one string are both sides run through processPunctuation and processDigitArticle; then the
# leave-one-out mean of min(1, matches among the other 9 / 3). Expected = what it computes.
TEN = 10
OFFICIAL_CASES = [
    # --- unanimous references: nothing is normalised, the strings must be equal as they are
    ("dog", ["dog"] * TEN, 1.0, 1.0),
    ("  dog\n", ["dog"] * TEN, 1.0, 1.0),  # whitespace strip applies to both branches
    ("dog.", ["dog"] * TEN, 0.0, 1.0),  # punctuation (period) kept
    ("dog?", ["dog"] * TEN, 0.0, 1.0),  # punctuation ("?") kept
    ("a dog", ["dog"] * TEN, 0.0, 1.0),  # article kept (the example)
    ("the dog", ["dog"] * TEN, 0.0, 1.0),
    ("two", ["2"] * TEN, 0.0, 1.0),  # number word not mapped
    ("dont", ["don't"] * TEN, 0.0, 1.0),  # contraction not restored
    ("1,000", ["1000"] * TEN, 0.0, 1.0),  # comma in a number kept
    ("1.5", ["1.5"] * TEN, 1.0, 1.0),  # decimal point: equal strings
    ("1.5.", ["1.5"] * TEN, 0.0, 1.0),  # trailing period kept; normalised drops it, keeps 1.5
    ("Dog", ["dog"] * TEN, 0.0, 1.0),  # not even lower-cased
    ("dog", [" dog"] + ["dog"] * 9, 1.0, 1.0),  # stripped references are all "dog"
    ("a dog", [" dog"] + ["dog"] * 9, 0.0, 1.0),  # ... so unanimous: the article stays
    # --- mixed references: both sides normalised
    ("a dog", ["dog"] * 9 + ["puppy"], 1.0, 1.0),  # article dropped
    ("Dog", ["dog"] * 5 + ["Dog"] * 5, 1.0, 1.0),  # references differing only in case are mixed
    ("a dog", ["dog"] * 5 + ["Dog"] * 5, 1.0, 1.0),
    ("dog.", ["dog"] * 2 + ["cat"] * 8, 0.6, 0.6),  # punctuation: 2 matches -> (2*1/3 + 8*2/3)/10
    ("dog!", ["dog"] * 3 + ["cat"] * 7, 0.9, 0.9),
    ("two", ["2"] * 3 + ["3"] * 7, 0.9, 0.9),  # number word -> digit (prediction)
    ("2", ["two"] * 3 + ["three"] * 7, 0.9, 0.9),  # number word -> digit (references)
    ("dont", ["don't"] * 4 + ["no"] * 6, 1.0, 1.0),  # contraction restored
    ("isnt", ["isn't"] * 1 + ["yes"] * 9, 0.3, 0.3),
    ("1,000", ["1000"] * 3 + ["1 000"] * 7, 0.9, 0.9),  # digit,digit: punctuation deleted
    ("1.5", ["1.5"] * 3 + ["15"] * 7, 0.9, 0.9),  # decimal point kept
    ("15", ["1.5"] * 3 + ["15"] * 7, 1.0, 1.0),
    ("5.", ["5"] * 2 + ["6"] * 8, 0.6, 0.6),  # period after a digit removed (malformed look-behind)
    ("t-shirt", ["t shirt"] * 3 + ["shirt"] * 7, 0.9, 0.9),  # "-" between letters -> space
    ("cat", ["dog"] * 5 + ["puppy"] * 5, 0.0, 0.0),
]


@pytest.mark.parametrize("pred, refs, official, normalised", OFFICIAL_CASES)
def test_agrees_with_the_official_evaluator_on_hand_worked_cases(pred, refs, official, normalised):
    assert vqa_accuracy(pred, refs) == pytest.approx(official, abs=1e-12)
    assert vqa_accuracy(pred, refs, "official") == pytest.approx(official, abs=1e-12)
    assert vqa_accuracy(pred, refs, "normalised") == pytest.approx(normalised, abs=1e-12)


def test_single_reference_is_normalised_under_both_metrics():
    # docs/science.md §5: one reference -> exact match after normalisation (the official script has no
    # such case; its leave-one-out would leave no reference and score 0 everywhere)
    for metric in ("official", "normalised"):
        assert vqa_accuracy("a dog.", ["dog"], metric) == 1.0
        assert vqa_accuracy("Two", ["2"], metric) == 1.0
        assert vqa_accuracy("cat", ["dog"], metric) == 0.0


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="metric"):
        vqa_accuracy("x", ["x", "y"], "vqa")


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
    with pytest.raises(TypeError):
        vqa_accuracy("x", "x")
    with pytest.raises(ValueError):
        vqa_correct(float("nan"))
    with pytest.raises(ValueError):
        vqa_correct(0.5, threshold=1.5)


def test_vqa_correct_threshold():
    assert vqa_correct(1.0) == 1
    assert vqa_correct(0.9) == 0  # default: full credit only
    assert vqa_correct(0.9, threshold=0.9) == 1
    assert vqa_correct(0.3 * 3, threshold=0.9) == 1  # 0.8999999999999999 still counts
    assert vqa_correct(0.0, threshold=0.3) == 0
    assert vqa_correct(0.3, threshold=0.3) == 1
    acc = vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7)
    assert vqa_correct(acc) == 0 and vqa_correct(acc, threshold=0.5) == 1


def _loo_reference(pred: str, answers: list[str]) -> float:
    """Literal leave-one-out loop as written in the official evaluator."""
    p = normalize_answer(pred)
    refs = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        accs.append(min(1.0, sum(r == p for r in others) / 3))
    return sum(accs) / len(accs)


_words = st.sampled_from(
    ["yes", "no", "2", "two", "a dog", "dog", "red", "Red.", "dont", "don't", "1.5"]
)


@given(pred=_words, answers=st.lists(_words, min_size=2, max_size=12))
def test_matches_literal_leave_one_out(pred, answers):
    acc = vqa_accuracy(pred, answers, "normalised")
    assert 0.0 <= acc <= 1.0 and not math.isnan(acc)
    assert acc == pytest.approx(_loo_reference(pred, answers), abs=1e-12)
    official = vqa_accuracy(pred, answers, "official")
    if len(set(answers)) > 1:  # the evaluator normalises exactly when the references differ
        assert official == acc
    else:  # unanimous: raw string equality (n - 1 others match, or none), never above normalised
        same = min(1.0, (len(answers) - 1) / 3) if pred == answers[0] else 0.0
        assert official == pytest.approx(same, abs=1e-12) and official <= acc


@given(text=st.text(max_size=30))
def test_normalize_never_fails_and_is_clean(text):
    out = normalize_answer(text)
    assert out == " ".join(out.split())  # single spaces, no tabs/newlines, stripped
    assert not ({"a", "an", "the"} & set(out.split()))

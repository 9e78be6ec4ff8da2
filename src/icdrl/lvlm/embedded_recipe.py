"""The training recipe of the embedded LVLM: question templates, answer forms, prompt sampling.

A chat LVLM asked a VQA question zero-shot often answers in the wrong *form* ("The shape is
blue."), which VQA scoring marks wrong; a demonstration of the same kind of question shows it the
short form. The embedded LVLM is trained to behave that way, with graded effects:

* Each demonstration "reminds" the model of the short form with a strength that depends on how
  close its question is to the query's: ``cue_exact`` for the same question template (the
  question with its colour and shape words masked), ``cue_kind`` for another template of the same
  answer kind (colour / shape / yes-no), 0 otherwise. The demonstrations combine as a noisy-OR:
  ``P(short) = 1 - prod_d (1 - cue_d)``. With no demonstration the model answers verbosely.
* The verbose form is ``"the answer is {answer}"``: one prefix for every question type, so the
  form is decided at the first answer token (where InfoScore sees it).
* Yes/no queries are drawn balanced (yes and no equally often per template), and same-template
  demonstrations of yes/no questions carry a yes or no independent of the query's answer, so that
  neither the question text nor copying a demonstration's answer pays: the model must read the
  image.

Everything here is pure Python on :class:`~icdrl.data.Example` records and a ``random.Random``.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from icdrl.data import Example

#: easy-VQA's colour and shape vocabulary (the dataset's generator uses exactly these words).
COLOURS = ("red", "green", "blue", "gray", "yellow", "teal", "black", "brown")
SHAPES = ("circle", "rectangle", "triangle")
KINDS = ("colour", "shape", "yesno")
#: The verbose answer form: one prefix for every question kind.
VERBOSE_PREFIX = "the answer is"

_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


def question_template(question: str) -> str:
    """The question with colour words replaced by ``<C>`` and shape words by ``<S>``."""
    q = " ".join(question.lower().split())
    return _SHAPE_RE.sub("<S>", _COLOUR_RE.sub("<C>", q))


def answer_kind(answer: str) -> str:
    """``colour``, ``shape`` or ``yesno`` (any answer that is not a colour or shape word)."""
    a = answer.strip().lower()
    if a in COLOURS:
        return "colour"
    if a in SHAPES:
        return "shape"
    return "yesno"


def is_negated(question: str) -> bool:
    """A question with "not" or "no" in it ("is there not a red shape?", "is no circle present?")."""
    words = re.findall(r"[a-z]+", question.lower())
    return "not" in words or "no" in words


def verbose_answer(answer: str) -> str:
    return f"{VERBOSE_PREFIX} {answer}"


def match_level(demo: Example, query: Example) -> str:
    """``exact`` (same question template), ``kind`` (same answer kind) or ``none``."""
    if question_template(demo.question) == question_template(query.question):
        return "exact"
    if answer_kind(demo.answer) == answer_kind(query.answer):
        return "kind"
    return "none"


def short_form_prob(
    demos: Sequence[Example], query: Example, cue_exact: float, cue_kind: float
) -> float:
    """Noisy-OR of the demonstrations' cues: the probability of answering in the short form."""
    cue = {"exact": cue_exact, "kind": cue_kind, "none": 0.0}
    p_verbose = 1.0
    for d in demos:
        p_verbose *= 1.0 - cue[match_level(d, query)]
    return 1.0 - p_verbose


@dataclass(frozen=True)
class TrainItem:
    """One training prompt: demonstrations, query, and the query's target answer form."""

    demos: tuple[Example, ...]
    query: Example
    p_short: float  # probability of the short form under the recipe (soft target, first token)
    short: bool  # the sampled form of the whole target sequence

    @property
    def target(self) -> str:
        return self.query.answer if self.short else verbose_answer(self.query.answer)


class RecipeIndex:
    """Indexes of the training split by kind, template, answer and question text."""

    def __init__(self, examples: Sequence[Example]):
        if not examples:
            raise ValueError("the embedded LVLM's training split is empty")
        self.examples = list(examples)
        self.by_kind: dict[str, list[int]] = defaultdict(list)
        self.by_template: dict[str, list[int]] = defaultdict(list)
        self.by_template_answer: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.by_question: dict[str, list[int]] = defaultdict(list)
        self.by_question_answer: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.templates_of_kind: dict[str, list[str]] = defaultdict(list)
        self.positive_templates_of_kind: dict[str, list[str]] = defaultdict(list)
        for i, ex in enumerate(self.examples):
            kind, tmpl = answer_kind(ex.answer), question_template(ex.question)
            self.by_kind[kind].append(i)
            if tmpl not in self.by_template:
                self.templates_of_kind[kind].append(tmpl)
                if not is_negated(tmpl):
                    self.positive_templates_of_kind[kind].append(tmpl)
            self.by_template[tmpl].append(i)
            self.by_template_answer[(tmpl, ex.answer)].append(i)
            self.by_question[ex.question].append(i)
            self.by_question_answer[(ex.question, ex.answer)].append(i)
        answers: dict[str, set[str]] = defaultdict(set)
        for t, a in self.by_template_answer:
            answers[t].add(a)
        self._answers = {t: sorted(a) for t, a in answers.items()}

    def answers_of(self, template: str) -> list[str]:
        """The distinct answers of the training questions with this template, sorted."""
        return self._answers[template]


def _pick(rng: random.Random, index: RecipeIndex, pool: Sequence[int], q: int) -> int | None:
    """A uniform draw from ``pool`` of an example that does not show the query's image, or None."""
    image = index.examples[q].image
    for _ in range(32):
        i = pool[rng.randrange(len(pool))]
        if index.examples[i].image != image:
            return i
    rest = [i for i in pool if index.examples[i].image != image]
    return rest[rng.randrange(len(rest))] if rest else None


def sample_query(
    rng: random.Random,
    index: RecipeIndex,
    kind_weights: Mapping[str, float],
    kinds: Sequence[str],
    balance_yesno: bool,
    positive_only: bool = False,
) -> int:
    """A query: kind by weight, template uniform within the kind.

    ``balance_yesno``: yes/no answers balanced per template (else as often as the split has
    them, so the question text's prior can be learnt). ``positive_only``: only templates
    without a negation.
    """
    templates = index.positive_templates_of_kind if positive_only else index.templates_of_kind
    present = [k for k in kinds if templates.get(k)]
    weights = [float(kind_weights.get(k, 0.0)) for k in present]
    if not present or sum(weights) <= 0:
        raise ValueError(f"no training questions of the kinds {list(kinds)} with positive weight")
    kind = rng.choices(present, weights=weights)[0]
    tmpl = rng.choice(templates[kind])
    if kind == "yesno" and balance_yesno:
        answer = rng.choice(index.answers_of(tmpl))
        pool = index.by_template_answer[(tmpl, answer)]
    else:
        pool = index.by_template[tmpl]
    return pool[rng.randrange(len(pool))]


def sample_random_demo(rng: random.Random, index: RecipeIndex, q: int, balance_yesno: bool) -> int:
    """A demonstration drawn uniformly from the training split (never showing the query's image).

    With ``balance_yesno`` a yes/no draw keeps its question template but takes yes or no with
    equal probability, so the demonstrations' answers (which are trained on too) carry no
    question-text prior.
    """
    i = _pick(rng, index, range(len(index.examples)), q)
    ex = index.examples[i]
    if balance_yesno and answer_kind(ex.answer) == "yesno":
        tmpl = question_template(ex.question)
        answers = [a for a in ("yes", "no") if index.by_template_answer.get((tmpl, a))]
        got = _pick(rng, index, index.by_template_answer[(tmpl, rng.choice(answers))], q)
        if got is not None:
            return got
    return i


def sample_similar_demo(
    rng: random.Random,
    index: RecipeIndex,
    q: int,
    balance_yesno: bool,
    answer_match_share: float = 0.0,
) -> int:
    """A demonstration "similar" to query ``q``: same question text, same template, same kind or random.

    Each of the four sources has probability 1/4. With probability ``answer_match_share`` a
    same-question demonstration also has the query's answer (another image showing what the
    query's image shows, as similarity retrieval finds): the demonstration's answer then tells
    the query's, which only a same-question demonstration can. Otherwise yes/no demonstrations
    from the same question text or template carry yes or no with equal probability
    (``balance_yesno``) or as often as the split has them.
    """
    query = index.examples[q]
    tmpl = question_template(query.question)
    kind = answer_kind(query.answer)
    source = rng.randrange(4)
    if source == 0 and answer_match_share > 0 and rng.random() < answer_match_share:
        got = _pick(rng, index, index.by_question_answer[(query.question, query.answer)], q)
        if got is not None:
            return got
    if source in (0, 1):
        pools, by_answer, key = (
            (index.by_question, index.by_question_answer, query.question)
            if source == 0
            else (index.by_template, index.by_template_answer, tmpl)
        )
        pool = pools[key]
        if kind == "yesno" and balance_yesno:
            answers = [a for a in ("yes", "no") if by_answer.get((key, a))]
            if answers:
                pool = by_answer[(key, rng.choice(answers))]
    elif source == 2:
        others = [t for t in index.templates_of_kind[kind] if t != tmpl] or [tmpl]
        pool = index.by_template[rng.choice(others)]
    else:
        return sample_random_demo(rng, index, q, balance_yesno)
    got = _pick(rng, index, pool, q)
    return got if got is not None else sample_random_demo(rng, index, q, balance_yesno)


def sample_item(
    rng: random.Random,
    index: RecipeIndex,
    *,
    kind_weights: Mapping[str, float],
    max_demos: int,
    similar_share: float,
    cue_exact: float,
    cue_kind: float,
    balance_yesno: bool = True,
    balance_yesno_queries: bool = True,
    answer_match_share: float = 0.0,
    warmup: bool = False,
    n_demos: int | None = None,
) -> TrainItem:
    """One training prompt under the recipe.

    ``warmup``: a zero-demonstration colour, shape or non-negated yes/no question. Yes/no
    answers are an XOR of "does the image show the asked word" and "is the question negated";
    balanced over all templates, neither alone predicts the answer and gradient descent sits on
    a plateau. Learning the match on non-negated questions first breaks it.
    Otherwise ``n_demos`` demonstrations (default: uniform in 0..``max_demos``), similar (see
    :func:`sample_similar_demo`) with probability ``similar_share``, else drawn uniformly from
    the training split. ``balance_yesno`` balances the yes/no demonstrations' answers (copying
    them never pays), ``balance_yesno_queries`` the queries' answers.
    """
    if warmup:
        q = sample_query(rng, index, kind_weights, KINDS, balance_yesno_queries, positive_only=True)
        n = 0
    else:
        q = sample_query(rng, index, kind_weights, KINDS, balance_yesno_queries)
        n = rng.randint(0, max_demos) if n_demos is None else int(n_demos)
    similar = rng.random() < similar_share
    demo_ids: list[int] = []
    for _ in range(n):
        if similar:
            demo_ids.append(sample_similar_demo(rng, index, q, balance_yesno, answer_match_share))
        else:
            demo_ids.append(sample_random_demo(rng, index, q, balance_yesno))
    demos = tuple(index.examples[i] for i in demo_ids)
    query = index.examples[q]
    p = short_form_prob(demos, query, cue_exact, cue_kind)
    return TrainItem(demos=demos, query=query, p_short=p, short=rng.random() < p)

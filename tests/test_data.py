"""Datasets: easy-VQA from its package, the official VQA format, seeded subsets, load-time errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from icdrl.data import (
    DatasetError,
    Example,
    check_dataset,
    easyvqa_qtype,
    load_dataset,
    load_easyvqa,
    load_image,
    load_vqa,
    majority_answer,
    seeded_subset,
)

FIX = Path(__file__).parent / "fixtures" / "vqa"


def vqa_cfg(root: Path = FIX, **over) -> dict:
    cfg = {
        "name": "vqa",
        "label": "okvqa",
        "train": {
            "questions": str(root / "train_questions.json"),
            "annotations": str(root / "train_annotations.json"),
            "images": str(root / "images" / "train2014"),
        },
        "eval": {
            "questions": str(root / "val_questions.json"),
            "annotations": str(root / "val_annotations.json"),
            "images": str(root / "images" / "val2014"),
        },
    }
    for split, sec in over.items():
        cfg[split] = {**cfg[split], **sec}
    return cfg


@pytest.fixture()
def vqa_copy(tmp_path) -> Path:
    dst = tmp_path / "vqa"
    shutil.copytree(FIX, dst)
    return dst


# ------------------------------------------------------------------------------ easy-VQA


@pytest.fixture(scope="module")
def easy():
    return {s: load_dataset({"name": "easyvqa"}, s) for s in ("train", "eval")}


def test_easyvqa_sizes_and_ids(easy):
    assert len(easy["train"]) == 38575
    assert len(easy["eval"]) == 9673
    assert [e.id for e in easy["train"][:5]] == [0, 1, 2, 3, 4]
    assert easy["train"][-1].id == 38574


def test_easyvqa_records(easy):
    ex = easy["train"][0]
    assert ex.question == "what is the blue shape?" and ex.answer == "rectangle"
    assert ex.answers == ("rectangle",)
    assert ex.image.endswith("train/images/0.png") and Path(ex.image).is_file()
    assert ex.image_id == "train/0" and ex.qtype == "shape"
    test0 = easy["eval"][0]
    assert "/test/images/" in test0.image and test0.image_id.startswith("test/")
    for e in easy["train"][:2000]:
        assert len(e.answers) == 1 and e.answer == e.answers[0]
        assert e.qtype in {"colour", "shape", "yes-no-colour", "yes-no-shape"}


def test_easyvqa_qtype_tags_agree_with_answers(easy):
    colours = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
    shapes = {"circle", "rectangle", "triangle"}
    want = {
        "colour": colours,
        "shape": shapes,
        "yes-no-colour": {"yes", "no"},
        "yes-no-shape": {"yes", "no"},
    }
    for e in easy["train"]:
        assert e.answer in want[e.qtype], e
    assert easyvqa_qtype("what color is the triangle?") == "colour"
    assert easyvqa_qtype("what is the color of the shape?") == "colour"
    assert easyvqa_qtype("what is the red shape?") == "shape"
    assert easyvqa_qtype("what shape is present?") == "shape"
    assert easyvqa_qtype("is there a circle in the image?") == "yes-no-shape"
    assert easyvqa_qtype("is there not a teal shape?") == "yes-no-colour"


def test_easyvqa_missing_root_fails_with_key_and_path(tmp_path):
    with pytest.raises(DatasetError, match=r"^dataset\.root: easy-VQA folder not found: .*nowhere"):
        load_dataset({"name": "easyvqa", "root": str(tmp_path / "nowhere")}, "train")


def test_easyvqa_missing_image_fails(tmp_path):
    split = tmp_path / "train"
    (split / "images").mkdir(parents=True)
    (split / "questions.json").write_text(json.dumps([["what color is the shape?", "red", 7]]))
    with pytest.raises(DatasetError, match=r"image not found: .*7\.png"):
        load_easyvqa("train", tmp_path)


def test_load_image_is_rgb_and_cached(easy):
    path = easy["train"][0].image
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (64, 64)
    assert load_image(path) is im
    with pytest.raises(DatasetError, match="image file not found"):
        load_image(str(Path(path).with_name("missing.png")))


# ------------------------------------------------------------------------------ VQA format


def test_vqa_loads_fixture():
    train = load_dataset(vqa_cfg(), "train")
    assert [e.id for e in train] == [90, 91, 250, 300, 420, 421]  # question ids, file order
    bus = train[0]
    assert len(bus.answers) == 10 and bus.answer == "red"
    assert (
        bus.image.endswith("train2014/COCO_train2014_000000000009.jpg")
        and Path(bus.image).is_file()
    )
    assert bus.image_id == "9" and bus.qtype == "what"
    assert train[2].answer == "dog"  # 4 dog / 4 puppy tie: the first seen wins
    assert train[5].answer == "fall"
    ev = load_dataset(vqa_cfg(), "eval")
    assert [e.id for e in ev] == [1000, 1010, 1020]
    assert ev[0].image.endswith("COCO_val2014_000000000100.jpg")  # prefix from data_subtype


def test_vqa_image_prefix_from_config(vqa_copy):
    d = vqa_copy / "images" / "val2014"
    for f in d.iterdir():
        f.rename(d / f.name.replace("COCO_val2014_", "X_"))
    cfg = vqa_cfg(vqa_copy, eval={"image_prefix": "X_"})
    assert load_dataset(cfg, "eval")[0].image.endswith("X_000000000100.jpg")
    with pytest.raises(
        DatasetError,
        match=r"^dataset\.eval\.images: image not found: .*COCO_val2014_000000000100\.jpg",
    ):
        load_dataset(vqa_cfg(vqa_copy), "eval")


def test_vqa_default_prefix_without_data_subtype(vqa_copy):
    q = vqa_copy / "val_questions.json"
    doc = json.loads(q.read_text())
    del doc["data_subtype"]
    q.write_text(json.dumps(doc))
    assert load_dataset(vqa_cfg(vqa_copy), "eval")[0].image.endswith(
        "COCO_val2014_000000000100.jpg"
    )


@pytest.mark.parametrize("key", ["questions", "annotations", "images"])
def test_vqa_missing_path_names_key_and_path(vqa_copy, key):
    cfg = vqa_cfg(vqa_copy, train={key: str(vqa_copy / "absent")})
    with pytest.raises(DatasetError, match=rf"^dataset\.train\.{key}: .*not found: .*absent$"):
        load_dataset(cfg, "train")


def test_vqa_missing_config_key():
    cfg = vqa_cfg()
    del cfg["train"]["annotations"]
    with pytest.raises(DatasetError, match=r"^dataset\.train\.annotations: missing"):
        load_dataset(cfg, "train")


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "file, edit, pattern",
    [
        (
            "train_annotations.json",
            lambda d: d["annotations"][1].pop("answers"),
            r"^dataset\.train\.annotations: .*train_annotations\.json: question_id 91 lacks field 'answers'$",
        ),
        (
            "train_questions.json",
            lambda d: d["questions"][0].pop("image_id"),
            r"^dataset\.train\.questions: .*train_questions\.json: question 0 lacks field 'image_id'$",
        ),
        (
            "train_questions.json",
            lambda d: d.pop("questions"),
            r"^dataset\.train\.questions: .*train_questions\.json lacks field 'questions'$",
        ),
        (
            "train_annotations.json",
            lambda d: d["annotations"].pop(0),
            r"^dataset\.train\.annotations: .*: no annotation for question_id 90$",
        ),
        (
            "train_annotations.json",
            lambda d: d["annotations"][0]["answers"][3].pop("answer"),
            r"^dataset\.train\.annotations: .*question_id 90: answer 3 lacks field 'answer'$",
        ),
        (
            "train_annotations.json",
            lambda d: d["annotations"][0].update(answers=[]),
            r"field 'answers' is empty",
        ),
        (
            "train_annotations.json",
            lambda d: d["annotations"][0].update(image_id=25),
            r"question_id 90: image_id 25 differs",
        ),
        (
            "train_questions.json",
            lambda d: d["questions"].append(dict(d["questions"][0])),
            r"duplicate question_id 90",
        ),
        (
            "train_questions.json",
            lambda d: d["questions"][0].update(question=7),
            r"question 0: field 'question' has type int",
        ),
    ],
)
def test_vqa_bad_fields_fail_in_one_line(vqa_copy, file, edit, pattern):
    _edit_json(vqa_copy / file, edit)
    with pytest.raises(DatasetError, match=pattern) as info:
        load_dataset(vqa_cfg(vqa_copy), "train")
    assert "\n" not in str(info.value)


def test_vqa_missing_image_fails(vqa_copy):
    (vqa_copy / "images" / "train2014" / "COCO_train2014_000000000030.jpg").unlink()
    with pytest.raises(
        DatasetError,
        match=r"^dataset\.train\.images: image not found: .*000000000030\.jpg \(question_id 300\)$",
    ):
        load_dataset(vqa_cfg(vqa_copy), "train")


def test_vqa_invalid_json(vqa_copy):
    (vqa_copy / "val_annotations.json").write_text("{not json")
    with pytest.raises(
        DatasetError, match=r"^dataset\.eval\.annotations: .*val_annotations\.json: not valid JSON"
    ):
        check_dataset(vqa_cfg(vqa_copy))


def test_load_vqa_direct_call():
    ex = load_vqa(
        FIX / "val_questions.json", FIX / "val_annotations.json", FIX / "images" / "val2014", "eval"
    )
    assert [e.answer for e in ex] == ["tennis", "banana", "night"]


def test_config_errors():
    with pytest.raises(DatasetError, match=r"^dataset\.name: 'coco'"):
        load_dataset({"name": "coco"}, "train")
    with pytest.raises(DatasetError, match=r"^dataset: split must be"):
        load_dataset({"name": "easyvqa"}, "test")
    with pytest.raises(DatasetError, match=r"^dataset\.train\.questoins: unknown key"):
        load_dataset(vqa_cfg(train={"questoins": "x"}), "train")
    with pytest.raises(DatasetError, match=r"^dataset\.eval\.subset: must be"):
        load_dataset(vqa_cfg(eval={"subset": -1}), "eval")


def test_check_dataset_passes_on_good_config():
    assert check_dataset(vqa_cfg()) is None


# ------------------------------------------------------------------------------ subsets


def _examples(n: int) -> list[Example]:
    return [Example(i, f"{i}.png", f"q{i}", ("a",), "a") for i in range(n)]


def test_seeded_subset_deterministic_ordered_nested():
    ex = _examples(100)
    a = seeded_subset(ex, 10, seed=3)
    assert a == seeded_subset(ex, 10, seed=3)
    assert len(a) == 10 and len({e.id for e in a}) == 10
    assert [e.id for e in a] == sorted(e.id for e in a)
    assert a != seeded_subset(ex, 10, seed=4)
    bigger = {e.id for e in seeded_subset(ex, 30, seed=3)}
    assert {e.id for e in a} <= bigger
    assert seeded_subset(ex, 500, seed=0) == ex
    assert seeded_subset(ex, None, seed=0) == ex
    assert seeded_subset(ex, 0, seed=0) == []


def test_subset_through_config():
    cfg = vqa_cfg(train={"subset": 3, "subset_seed": 1})
    sub = load_dataset(cfg, "train")
    full = load_dataset(vqa_cfg(), "train")
    assert len(sub) == 3 and sub == seeded_subset(full, 3, 1)
    easy = load_dataset({"name": "easyvqa", "eval": {"subset": 50, "subset_seed": 0}}, "eval")
    assert len(easy) == 50 and all(e.image_id.startswith("test/") for e in easy)


def test_majority_answer_unchanged():
    assert majority_answer(["b", "a", "a", "b"]) == "b"
    assert majority_answer(["x"]) == "x"

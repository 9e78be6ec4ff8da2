"""Issue 15: bad inputs fail early, in one line naming the key (and config file) or the file and
the item — NaN/inf config values, impossible sizes, empty questions and answers, cut images —
and shots have one spelling in result paths."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from workflow_util import CONFIG, snakemake

from icdrl.checks import (
    ImageReport,
    SizeError,
    check_data,
    check_embedded_sizes,
    check_images,
    check_pool_size,
    check_sizes,
    quick_image_check,
)
from icdrl.config import ConfigError, load_config, name_sources, validate
from icdrl.data import DatasetError, Example, load_dataset, load_image
from icdrl.grid import canonical_shots
from icdrl.layout import Layout
from icdrl.metrics import vqa_accuracy

FIX = Path(__file__).parent / "fixtures" / "vqa"


def _raw(name: str = "test.yaml") -> dict:
    return yaml.safe_load((CONFIG / name).read_text())


def _write(tmp_path: Path, name: str, cfg: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


# ----------------------------------------------------------------------------- NaN / inf in config


@pytest.mark.parametrize(
    "key",
    [
        "train.v3.kl_beta",
        "embedded_lvlm.lr",
        "scoring.correct_threshold",
        "rewards.info_scale",
        "grid.weights[0][1]",
        "embedded_lvlm.kind_weights.yesno",
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    # issue 15: "canonical: nan is not a finite number", a Snakefile traceback naming no key
    cfg = _raw()
    node, parts = cfg, key.replace("[", ".").replace("]", "").split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == f"config key {key}: {value} is not a finite number"


def test_config_errors_name_the_file_that_sets_the_key(tmp_path):
    a = _write(tmp_path, "a.yaml", _raw())
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  v3:\n    kl_beta: .nan\n")
    assert name_sources("config key train.v3.kl_beta: nan is not a finite number", [a, b]) == (
        f"config key train.v3.kl_beta: nan is not a finite number (set in {b})"
    )
    # a key no file sets (a default, or a check across keys): every file read is named
    assert name_sources("config key train.v2.top_beams: 9 beams", [a, b]) == (
        f"config key train.v2.top_beams: 9 beams (config files: {a}, {b})"
    )
    assert (
        name_sources("config key pools.size: x", [a], {"pools": {"size": 3}})
        == f"config key pools.size: x (set in {a}, --config)"
    )
    assert name_sources("config key pools.sizee: x", [a], {"pools": {"sizee": 3}}).endswith(
        "(set in --config)"
    )
    assert name_sources("HARD_WEIGHT='x' is not a number", [a]) == "HARD_WEIGHT='x' is not a number"
    bad = _raw()
    bad["pools"]["size"] = float("nan")
    with pytest.raises(
        ConfigError,
        match=rf"config key pools.size: .* \(set in {_write(tmp_path, 'c.yaml', bad)}\)$",
    ):
        load_config(tmp_path / "c.yaml")


def test_snakemake_names_the_key_and_which_of_two_config_files(tmp_path):
    a = _write(tmp_path, "a.yaml", _raw())
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  v3:\n    kl_beta: .nan\n")
    proc = snakemake("-n", "--configfile", str(a), str(b), workdir=tmp_path)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("icdrl:")]
    assert lines == [f"icdrl: config key train.v3.kl_beta: nan is not a finite number (set in {b})"]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- shots


def test_shots_are_sorted_and_deduplicated_before_entering_a_path():
    cfgs = []
    for shots in ([1, 2, 4], [4, 1, 2], [2, 4, 1, 1]):
        cfg = _raw()
        cfg["evaluation"]["shots"] = shots
        cfgs.append(validate(cfg))
    assert all(c["evaluation"]["shots"] == [1, 2, 4] for c in cfgs)
    names = {Layout(c).eval_name["test"] for c in cfgs}
    assert len(names) == 1 and "-k1.2.4-" in names.pop()
    # Layout spells them canonically even for a config that skipped validation
    raw = validate(_raw())
    raw["evaluation"]["shots"] = [3, 1, 3]
    assert "-k1.3-" in Layout(raw).eval_name["test"] and canonical_shots((3, 1, 3)) == [1, 3]


# ----------------------------------------------------------------------------- sizes


def _test_cfg(**pools) -> dict:
    cfg = validate(_raw())
    cfg["pools"].update(pools)
    return cfg


@pytest.mark.parametrize(
    "pools, key, n, avail",
    [
        ({"n_test": 500}, "pools.n_test", 500, 300),  # issue 15: wrote test-n500.jsonl holding 300
        ({"n_anchors": 1200}, "pools.n_anchors", 1200, 1000),
        ({"size": 1000}, "pools.size", 1000, 999),  # issue 15: failed only after LVLM training
    ],
)
def test_impossible_sizes_fail_before_any_job_naming_the_key(pools, key, n, avail):
    cfg = _test_cfg(**pools)
    with pytest.raises(SizeError) as e:
        check_data(cfg)
    assert str(e.value).startswith(f"config key {key}: {n} exceeds the {avail} "), str(e.value)


def test_n_val_and_subsets_are_checked_too():
    cfg = _test_cfg(n_test=200, n_val=150)
    with pytest.raises(
        SizeError,
        match=r"^config key pools.n_val: 150 validation queries and pools.n_test: 200 "
        r"test queries \(disjoint\) exceed the 300 examples of the eval split",
    ):
        check_sizes(cfg, [object()] * 1000, [object()] * 300)
    cfg = validate(_raw())
    cfg["dataset"]["eval"]["subset"] = 20_000
    with pytest.raises(
        SizeError, match=r"^config key dataset.eval.subset: 20000 exceeds the 9673 examples"
    ):
        check_data(cfg)


def _ex(i: int, image: str, question: str = "what color?") -> Example:
    return Example(
        id=i, image=image, question=question, answers=("red",), answer="red", image_id=image
    )


def test_pool_size_counts_the_exclusions():
    # 6 train examples, 3 of them exact duplicates of anchor 0 (same image and question)
    train = [_ex(0, "a"), _ex(1, "a"), _ex(2, "a"), _ex(3, "b"), _ex(4, "c"), _ex(5, "d")]
    check_pool_size("pools.size", 3, train[:1], train, "anchors")
    with pytest.raises(
        SizeError,
        match=r"^config key pools.size: 4 exceeds the 3 eligible train examples of anchors "
        r"query 0 \(6 minus the query itself and its exact duplicates, 3\)",
    ):
        check_pool_size("pools.size", 4, train[:1], train, "anchors")
    # a test query duplicating two train examples
    check_pool_size("pools.size", 5, [_ex(9, "d")], train, "test")
    with pytest.raises(SizeError, match="6 exceeds the 5 eligible"):
        check_pool_size("pools.size", 6, [_ex(9, "d")], train, "test")


def test_embedded_check_sizes_against_easyvqa():
    train = [_ex(i, f"t{i}") for i in range(50)]
    test = [_ex(i, f"e{i}") for i in range(20)]
    check_embedded_sizes({"check": {"n_test": 20, "n_anchors": 10, "pool_size": 49}}, train, test)
    for ck, key in (
        ({"n_test": 21}, "n_test"),
        ({"n_anchors": 51}, "n_anchors"),
        ({"pool_size": 50}, "pool_size"),
        ({"train_subset": 51}, "train_subset"),
    ):
        with pytest.raises(SizeError, match=rf"^config key embedded_lvlm.check.{key}: "):
            check_embedded_sizes(
                {"check": {"n_test": 5, "n_anchors": 5, "pool_size": 4, **ck}}, train, test
            )


def test_write_pools_refuses_more_queries_than_the_split(tmp_path):
    from icdrl.pools import write_pools

    cfg = validate(_raw())
    with pytest.raises(
        ValueError, match=r"config key pools.n_test: 500 exceeds the 300 examples of the eval split"
    ):
        write_pools(
            cfg["dataset"],
            "test",
            {**cfg["pools"], "n_test": 500},
            None,
            None,
            tmp_path / "p.jsonl",
        )
    assert not (tmp_path / "p.jsonl").exists()


def test_snakemake_refuses_an_impossible_size_before_the_first_job(tmp_path):
    cfg = _raw()
    cfg["pools"]["n_test"] = 500
    path = _write(tmp_path, "big.yaml", cfg)
    proc = snakemake("--cores", "1", "--configfile", str(path), workdir=tmp_path, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("icdrl:")]
    assert lines == [
        f"icdrl: config key pools.n_test: 500 exceeds the 300 examples of the eval split "
        f"(dataset.eval.subset: 300) (set in {path})"
    ]
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- images


@pytest.fixture
def vqa(tmp_path) -> Path:
    dst = tmp_path / "vqa"
    shutil.copytree(FIX, dst)
    return dst


def _vqa_cfg(root: Path) -> dict:
    return {
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


def _cut(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_jpeg_fails_up_front_with_path_and_question_id(vqa):
    # issue 15: failed late (after LVLM training) with "image file is truncated" and no path
    img = vqa / "images" / "train2014" / "COCO_train2014_000000000025.jpg"
    examples = load_dataset(_vqa_cfg(vqa), "train")
    assert check_images(examples, "dataset.train.images") == ImageReport(n_images=4, n_decoded=0)
    _cut(img)
    assert quick_image_check(img) is False
    with pytest.raises(DatasetError) as e:
        check_images(examples, "dataset.train.images")
    assert str(e.value).startswith(
        f"dataset.train.images: image {img} (question id 250): cannot be decoded ("
    )
    # the first job that reads it names the path
    with pytest.raises(DatasetError, match=rf"^image {img}: cannot be decoded \("):
        load_image(str(img))


def test_a_truncated_png_and_the_fallbacks(tmp_path):
    from PIL import Image

    png, jpg, bmp = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.bmp"
    noise = bytes(
        (i * 7919) % 251 for i in range(64 * 64 * 3)
    )  # incompressible-ish: a long image data chunk
    Image.frombytes("RGB", (64, 64), noise).save(png)
    Image.new("RGB", (64, 64), (10, 200, 10)).save(jpg)
    Image.new("RGB", (64, 64), (10, 10, 200)).save(bmp)
    exs = [_ex(1, str(png)), _ex(2, str(jpg)), _ex(3, str(bmp))]
    assert (
        quick_image_check(png) is True
        and quick_image_check(jpg) is True
        and quick_image_check(bmp) is None
    )
    assert check_images(exs, "k") == ImageReport(3, 1)  # the BMP had a full decode
    jpg.write_bytes(
        jpg.read_bytes() + b"trailing bytes"
    )  # valid JPEG, bytes after its end: decoded, accepted
    assert check_images(exs, "k") == ImageReport(3, 2)
    png_bytes = png.read_bytes()
    png.write_bytes(
        png_bytes[:-12]
    )  # only the IEND chunk lost: every pixel is there, the decode accepts it
    assert quick_image_check(png) is False and check_images(exs, "k") == ImageReport(3, 3)
    png.write_bytes(png_bytes)
    _cut(png, 0.9)
    with pytest.raises(
        DatasetError, match=rf"^k: image {png} \(question id 1\): cannot be decoded"
    ):
        check_images(exs, "k")
    png.write_bytes(b"")
    with pytest.raises(
        DatasetError, match=rf"^k: image {png} \(question id 1\): cannot be decoded"
    ):
        check_images(exs, "k")


def test_snakemake_refuses_a_truncated_image_before_the_first_job(tmp_path, vqa):
    cfg = _raw()
    cfg["dataset"] = _vqa_cfg(vqa)
    cfg["pools"].update(size=3, n_anchors=2, n_test=2, n_val=0)
    cfg["candidates"]["shards"] = 1
    cfg["evaluation"]["shots"] = [1, 2]
    cfg["embedded_lvlm"]["check"].update(n_test=4, n_anchors=2, pool_size=4)
    img = vqa / "images" / "val2014" / "COCO_val2014_000000000101.jpg"
    _cut(img)
    path = _write(tmp_path, "vqa.yaml", cfg)
    proc = snakemake("--cores", "1", "--configfile", str(path), workdir=tmp_path, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("icdrl:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"icdrl: dataset.eval.images: image {img} (question id 1010): cannot be decoded"
    ), lines
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- empty text


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _set_answers(doc, i, answers):
    doc["annotations"][i]["answers"] = [
        {"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)
    ]


@pytest.mark.parametrize("answers", [["   "] * 10, [""] * 10, ["\t"]])
def test_all_empty_answers_are_refused_naming_question_and_file(vqa, answers):
    # issue 15: all-empty answers failed only at the candidates stage, with no question id
    _edit(vqa / "train_annotations.json", lambda d: _set_answers(d, 0, answers))
    with pytest.raises(
        DatasetError,
        match=r"^dataset.train.annotations: .*train_annotations.json: question_id 90: "
        r"every annotator answer is empty",
    ):
        load_dataset(_vqa_cfg(vqa), "train")


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_an_empty_question_is_refused_naming_question_and_file(vqa, text):
    _edit(vqa / "val_questions.json", lambda d: d["questions"][1].update(question=text))
    with pytest.raises(
        DatasetError,
        match=r"^dataset.eval.questions: .*val_questions.json: question_id 1010: "
        r"the question text is empty$",
    ):
        load_dataset(_vqa_cfg(vqa), "eval")


def test_some_empty_answers_are_refused_or_dropped_counted_and_logged(vqa, caplog):
    refs = ["red"] * 6 + ["maroon"] * 3 + [""]
    # the official evaluator keeps "" as a reference: an answer normalising to nothing gets 0.3
    assert vqa_accuracy("the the the", refs) == pytest.approx(0.3)
    _edit(
        vqa / "train_annotations.json",
        lambda d: (_set_answers(d, 0, refs), _set_answers(d, 3, ["no"] * 9 + [" "])),
    )
    cfg = _vqa_cfg(vqa)
    with pytest.raises(DatasetError) as e:
        load_dataset(cfg, "train")
    msg = str(e.value)
    assert (
        msg.startswith("dataset.train.annotations: ")
        and "train_annotations.json: question_id 90: " in msg
    )
    assert (
        "2 questions of this file have 2 empty answers" in msg
        and "dataset.train.empty_answers: drop" in msg
    )
    cfg["train"]["empty_answers"] = "drop"
    with caplog.at_level("WARNING", logger="icdrl.data"):
        exs = {ex.id: ex for ex in load_dataset(copy.deepcopy(cfg), "train")}
    assert (
        exs[90].answers == tuple(["red"] * 6 + ["maroon"] * 3) and exs[300].answers == ("no",) * 9
    )
    assert "dropped 2 empty annotator answers of 2 questions (e.g. question_id 90" in caplog.text
    assert vqa_accuracy("the the the", exs[90].answers) == 0.0
    # the key passes the config schema
    full = validate({**_raw(), "dataset": cfg})
    assert full["dataset"]["train"]["empty_answers"] == "drop"

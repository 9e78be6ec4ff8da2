"""Embeddings (docs/science.md §2): normalisation, the .npz table, the CLIP and LVLM encoders offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stage_fakes import make_examples, patch_dataset

from icdrl.embeddings import (
    EmbeddingTable,
    combine,
    compute_embeddings,
    embed_split,
    l2_normalize,
    save_embeddings,
)


def test_normalize_and_combine_never_nan():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    n = l2_normalize(x)
    assert n.dtype == np.float32 and np.allclose(n, [[0.6, 0.8], [0, 0]]) and np.isfinite(n).all()
    img, txt = np.array([[1.0, 0.0]]), np.array([[0.0, 5.0]])
    assert np.allclose(combine(img, txt), [[2**-0.5, 2**-0.5]])


def test_table_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    ids = [7, 3, 11]
    t = save_embeddings(tmp_path / "e.npz", ids, rng.normal(size=(3, 4)), rng.normal(size=(3, 4)))
    loaded = EmbeddingTable.load(tmp_path / "e.npz")
    assert loaded.ids.dtype == np.int64 and list(loaded.ids) == ids
    assert loaded.emb.dtype == np.float32 and np.allclose(
        np.linalg.norm(loaded.emb, axis=1), 1, atol=1e-6
    )
    assert np.allclose(loaded.emb, t.emb) and loaded.row(11) == 2
    assert np.allclose(loaded.vectors([11, 7], "img"), t.img[[2, 0]])
    assert np.allclose(loaded.emb, combine(loaded.img, loaded.txt), atol=1e-6)
    with pytest.raises(KeyError, match="e.npz: id 5 has no embedding"):
        loaded.vectors([5])
    np.savez(tmp_path / "bad.npz", ids=np.array([1]))
    with pytest.raises(ValueError, match="bad.npz: embeddings file lacks the array 'emb'"):
        EmbeddingTable.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="duplicate ids"):
        EmbeddingTable(ids=np.array([1, 1]), emb=np.zeros((2, 3), np.float32))


def _images(tmp_path, n=3):
    from PIL import Image

    paths = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"][:n]):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (48, 40), colour).save(p)
        paths.append(str(p))
    return paths


def _tiny_clip(folder, words):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=24,
            eos_token_id=3,
            bos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)


def _check_features(exs, img, txt):
    assert (
        img.shape[0] == txt.shape[0] == len(exs)
        and np.isfinite(img).all()
        and np.isfinite(txt).all()
    )
    # questions sharing an image share its image vector; different images differ
    assert np.allclose(img[0], img[3]) and not np.allclose(img[0], img[1], atol=1e-4)
    assert np.allclose(txt[1], txt[4]) and not np.allclose(txt[0], txt[1], atol=1e-4)


def _examples(tmp_path):
    # ids 0..4; image of 3 = image of 0; question of 4 = question of 1
    paths = _images(tmp_path)
    exs = make_examples(5, images=paths)
    exs[4] = type(exs[4])(**{**exs[4].__dict__, "question": exs[1].question, "image": paths[2]})
    return exs


def test_clip_encoder_offline(tmp_path, monkeypatch):
    exs = _examples(tmp_path)
    words = sorted({w for ex in exs for w in ex.question.split()})
    _tiny_clip(tmp_path / "clip", words)
    img, txt = compute_embeddings(
        exs, {"encoder": "clip", "clip_path": str(tmp_path / "clip"), "batch_size": 2}
    )
    assert img.shape == txt.shape == (5, 16)
    _check_features(exs, img, txt)
    patch_dataset(monkeypatch, {"train": exs})
    embed_split(
        {},
        "train",
        {"encoder": "clip", "clip_path": str(tmp_path / "clip"), "batch_size": 2},
        {},
        None,
        str(tmp_path / "out" / "train.npz"),
    )
    t = EmbeddingTable.load(tmp_path / "out" / "train.npz")
    assert list(t.ids) == [0, 1, 2, 3, 4] and np.allclose(t.img, l2_normalize(img), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="clip_path"):
        compute_embeddings(exs, {"encoder": "clip", "clip_path": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="encoder"):
        compute_embeddings(exs, {"encoder": "sift"})


def test_lvlm_encoder_offline(tmp_path):
    from icdrl.lvlm import qwen

    exs = _examples(tmp_path)
    words = sorted({w for ex in exs for w in ex.question.replace("?", " ? ").split()})
    tok = qwen.build_word_tokenizer(words)
    proc = qwen.Qwen2_5_VLImageProcessor(
        image_processor=qwen.build_image_processor(),
        tokenizer=tok,
        chat_template=qwen.QWEN_CHAT_TEMPLATE,
    )
    from transformers.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(qwen.tiny_qwen_config(tok))
    model.save_pretrained(tmp_path / "lvlm")
    proc.save_pretrained(tmp_path / "lvlm")
    img, txt = compute_embeddings(
        exs, {"encoder": "lvlm", "batch_size": 2}, {"device": "cpu"}, str(tmp_path / "lvlm")
    )
    assert img.shape == txt.shape == (5, 64)
    _check_features(exs, img, txt)
    # the image vector is the mean of the vision tower's merged tokens for that image
    enc = proc.image_processor(
        images=[__import__("PIL.Image").Image.open(exs[1].image).convert("RGB")],
        return_tensors="pt",
    )
    with torch.no_grad():
        feats = model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output[
            0
        ]
    assert np.allclose(img[1], feats.mean(0).numpy(), atol=1e-5)
    # bitwise what plain transformers (one attention call per image) gives for the same batch
    from icdrl.embeddings import _unique_images

    paths, which = _unique_images(exs)
    first = paths[:2]
    enc = proc.image_processor(
        images=[__import__("PIL.Image").Image.open(p).convert("RGB") for p in first],
        return_tensors="pt",
    )
    with torch.inference_mode():
        plain = [
            t.float().mean(0).numpy()
            for t in model.get_image_features(
                enc["pixel_values"], enc["image_grid_thw"]
            ).pooler_output
        ]
    for j, vec in enumerate(plain):
        assert np.array_equal(img[list(which).index(j)], vec)

"""Embedded-LVLM training steps on CPU: the old per-step path against the project's, side by side.

The default recipe (``icdrl.lvlm.embedded.DEFAULT``: the model of ``config/config.yaml``, batch
32, up to 4 demonstrations, the whole easy-VQA train split), seed 0. Two copies of the same
randomly initialised model train on the same sampled batches, step by step, alternating which
path goes first:

* reference -- the code before the speed work, kept here verbatim: the processor on every
  batch (each demonstration and query image preprocessed again, its pixels then dropped for the
  cached features), the chat template through Jinja per prompt, the model's own rope positions
  and key/value cache, transformers' vision attention one image at a time, the image processor
  on every vision-pretrain batch;
* project -- ``icdrl.lvlm.embedded`` as ``train_embedded`` runs it (images preprocessed once,
  text-only tokenisation, composed rope positions, segment-batched vision attention).

Both must stay bitwise equal (every loss, and every parameter at the end); the benchmark stops
with an error otherwise. Phases: ``--vision-steps`` stage-1 steps (64 images each), the feature
cache of the images the main steps use, ``--steps`` main-loop steps after the warm-up (uniform
0-4 demonstrations, as 90% of the default's steps).

    python benchmarks/bench_embedded_train.py [--steps 20] [--vision-steps 10] [--threads 2]

Prints seconds per step of each path and phase (wall and process CPU), and last
``speedup <ratio>`` (reference / project wall time over all timed steps). The machine's load
drifts; compare the two columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time

import torch

from icdrl.lvlm import embedded as E
from icdrl.lvlm import embedded_recipe as recipe
from icdrl.lvlm.vision_segments import batched_segments

# ------------------------------------------------------------------ the reference (old code, verbatim)


def reference_encode_items(processor, items, images, features=None) -> E.Batch:
    """``encode_items`` before the speed work: the processor on text and images every batch."""
    from icdrl.lvlm.prompt import build_messages

    texts = [
        processor.apply_chat_template(
            build_messages(it.demos, it.query, answer=it.target), tokenize=False
        )
        for it in items
    ]
    ims = [[images(ex.image) for ex in (*it.demos, it.query)] for it in items]
    enc = processor(text=texts, images=ims, padding=True, return_tensors="pt")
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    short_, answer_, colon, nl = tid("Short"), tid("answer"), tid(":"), tid("\n")
    im_start, im_end, assistant = tid("<|im_start|>"), tid("<|im_end|>"), tid("assistant")
    verbose_first = tid(recipe.VERBOSE_PREFIX.split()[0])
    positions, targets, is_query, soft_rows, soft_short, soft_p = [], [], [], [], [], []
    for row, it in enumerate(items):
        ids = enc["input_ids"][row].tolist()
        n = int(enc["attention_mask"][row].sum())  # right padding
        # demonstration answers
        for j in range(2, n):
            if ids[j - 2] == short_ and ids[j - 1] == answer_ and ids[j] == colon:
                k = j + 1
                while k < n and ids[k] not in (nl, im_end):
                    positions.append((row, k))
                    targets.append(ids[k])
                    is_query.append(False)
                    k += 1
        # the assistant turn
        start = (
            max(
                j
                for j in range(2, n)
                if ids[j - 2] == im_start and ids[j - 1] == assistant and ids[j] == nl
            )
            + 1
        )
        soft_rows.append(len(positions))
        soft_short.append(tok(it.query.answer, add_special_tokens=False)["input_ids"][0])
        soft_p.append(it.p_short)
        for k in range(start, n):
            positions.append((row, k))
            targets.append(ids[k])
            is_query.append(True)
            if ids[k] == im_end:
                if k + 1 < n:
                    positions.append((row, k + 1))
                    targets.append(ids[k + 1])
                    is_query.append(True)
                break
        if verbose_first == soft_short[-1]:
            raise ValueError(
                f"answer {it.query.answer!r} starts with the verbose prefix's first word"
            )
    inputs = dict(enc)
    if features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs.pop("pixel_values")
        feats = [features[ex.image] for it in items for ex in (*it.demos, it.query)]
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    return E.Batch(
        inputs=inputs,
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        soft_rows=torch.tensor(soft_rows, dtype=torch.long),
        soft_short=torch.tensor(soft_short, dtype=torch.long),
        soft_p=torch.tensor(soft_p, dtype=torch.float32),
        is_query=torch.tensor(is_query, dtype=torch.bool),
    )


def reference_batch_loss(model, batch, verbose_first: int, first_token_weight: float):
    """``batch_loss`` with the model's default forward (key/value cache on, its own rope positions)."""
    logits = model(**batch.inputs).logits
    rows, pos = batch.positions[:, 0], batch.positions[:, 1]
    logp = torch.log_softmax(logits[rows, pos - 1].float(), dim=-1)
    nll = -logp.gather(1, batch.targets[:, None])[:, 0]
    first = logp[batch.soft_rows]
    soft = -(
        batch.soft_p * first.gather(1, batch.soft_short[:, None])[:, 0]
        + (1.0 - batch.soft_p) * first[:, verbose_first]
    )
    nll = nll.clone()
    nll[batch.soft_rows] = soft
    w = torch.ones_like(nll)
    w[batch.soft_rows] = float(first_token_weight)
    return (w * nll).sum() / w.sum()


# ------------------------------------------------------------------ one step of each path


class Path_:
    """One model copy, its optimiser and the functions of one path."""

    def __init__(self, name: str, model, processor, c: E.EmbeddedConfig, reference: bool):
        self.name, self.model, self.processor, self.c, self.reference = (
            name,
            model,
            processor,
            c,
            reference,
        )
        self.images = E.ImageCache()
        self.wall = {"vision": 0.0, "features": 0.0, "main": 0.0}
        self.cpu = dict(self.wall)
        vis = model.model.visual
        self.vparams = [*vis.parameters(), model.get_input_embeddings().weight]
        self.vopt = torch.optim.AdamW(self.vparams, lr=c.lr)
        self.opt = None

    def timed(self, phase, fn, *a):
        t, p = time.perf_counter(), time.process_time()
        out = fn(*a)
        self.wall[phase] += time.perf_counter() - t
        self.cpu[phase] += time.process_time() - p
        return out

    def vision_step(self, step: int, batch, labels, col_ids, shp_ids) -> float:
        c, model = self.c, self.model
        vis, embed = model.model.visual, model.get_input_embeddings()
        if self.reference:
            enc = self.processor.image_processor(
                images=[self.images(p) for p in batch], return_tensors="pt"
            )
            pooled = vis(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
        else:
            enc = self.images.pixels(self.processor.image_processor, batch)
            with batched_segments(model):
                pooled = vis(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
        # the rest is pretrain_vision's step, the same for both
        pooled = torch.nn.functional.normalize(
            pooled.view(len(batch), -1, pooled.shape[-1]).mean(1), dim=-1
        )
        words = torch.nn.functional.normalize(embed.weight, dim=-1)
        col = torch.tensor([labels[p][0] for p in batch])
        shp = torch.tensor([labels[p][1] for p in batch])
        loss = torch.nn.functional.cross_entropy(
            pooled @ words[col_ids].T / 0.1, col, ignore_index=-1
        ) + torch.nn.functional.cross_entropy(pooled @ words[shp_ids].T / 0.1, shp, ignore_index=-1)
        for g in self.vopt.param_groups:
            g["lr"] = c.lr * min(1.0, (step + 1) / max(c.lr_warmup_steps, 1))
        self.vopt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vparams, c.grad_clip)
        self.vopt.step()
        return loss.item()

    def features(self, paths) -> dict:
        model = self.model
        model.model.visual.requires_grad_(False)
        model.model.visual.eval()
        if not self.reference:
            return E.vision_features(model, self.processor, paths, self.images)
        out = {}
        with torch.no_grad():
            for i in range(0, len(paths), 128):
                chunk = list(paths[i : i + 128])
                enc = self.processor.image_processor(
                    images=[self.images(p) for p in chunk], return_tensors="pt"
                )
                feats = model.model.get_image_features(
                    enc["pixel_values"], enc["image_grid_thw"]
                ).pooler_output
                out.update(zip(chunk, (f.detach() for f in feats)))
        return out

    def main_step(self, step: int, items, features, verbose_first: int) -> float:
        c, model = self.c, self.model
        if self.opt is None:
            self.opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad],
                lr=c.lr,
                weight_decay=c.weight_decay,
            )
        if self.reference:
            batch = reference_encode_items(self.processor, items, self.images, features)
            loss = reference_batch_loss(model, batch, verbose_first, c.first_token_weight)
        else:
            batch = E.encode_items(self.processor, items, self.images, features)
            loss, _ = E.batch_loss(model, batch, verbose_first, c.first_token_weight)
        for g in self.opt.param_groups:
            g["lr"] = E.lr_at(step, c)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], c.grad_clip
        )
        self.opt.step()
        return loss.item()


def _same(a: float, b: float, what: str) -> None:
    if a != b:
        sys.exit(
            f"error: {what}: reference {a!r} != project {b!r} (the paths must be bitwise equal)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="main-loop steps (after the warm-up)")
    ap.add_argument("--vision-steps", type=int, default=10, help="vision-pretrain steps (0: skip)")
    ap.add_argument("--threads", type=int, default=E.EmbeddedConfig().threads)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c = E.EmbeddedConfig.from_dict(E.DEFAULT)
    E.seed_everything(c.seed)
    train = E.load_split("train")
    index = recipe.RecipeIndex(train)
    processor = E.build_processor(c, E.vocabulary(train))
    model = E.build_model(c, processor.tokenizer)
    model.train()
    ref = Path_("reference", model, processor, c, reference=True)
    new = Path_("project", copy.deepcopy(model), processor, c, reference=False)
    order = [ref, new]
    rng = random.Random(c.seed)

    labels = E.image_labels(train)
    paths = sorted(labels)
    tok = processor.tokenizer
    col_ids = torch.tensor(tok.convert_tokens_to_ids(list(recipe.COLOURS)))
    shp_ids = torch.tensor(tok.convert_tokens_to_ids(list(recipe.SHAPES)))
    for step in range(args.vision_steps):
        batch = [paths[rng.randrange(len(paths))] for _ in range(c.vision_pretrain_batch)]
        losses = {
            p.name: p.timed("vision", p.vision_step, step, batch, labels, col_ids, shp_ids)
            for p in order
        }
        _same(losses["reference"], losses["project"], f"vision step {step} loss")
        order.reverse()

    n_warm = int(round(c.warmup_share * c.steps))
    steps = []
    for _ in range(args.steps):
        steps.append(E.sample_batch(c, rng, index, warmup=False))
    used = sorted({ex.image for items in steps for it in items for ex in (*it.demos, it.query)})
    feats = {}
    for p in order:
        feats[p.name] = p.timed("features", p.features, used)
    if any(not torch.equal(feats["reference"][k], feats["project"][k]) for k in used):
        sys.exit("error: vision features differ between the paths")
    new.images.drop_pixels()
    verbose_first = tok.convert_tokens_to_ids(recipe.VERBOSE_PREFIX.split()[0])
    for i, items in enumerate(steps):
        losses = {
            p.name: p.timed("main", p.main_step, n_warm + i, items, feats[p.name], verbose_first)
            for p in order
        }
        _same(losses["reference"], losses["project"], f"main step {i} loss")
        order.reverse()
    sd_ref, sd_new = ref.model.state_dict(), new.model.state_dict()
    if any(not torch.equal(sd_ref[k], sd_new[k]) for k in sd_ref):
        sys.exit("error: the two models' parameters differ after training")

    load = os.getloadavg()
    print(
        f"default recipe, {args.threads} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{len(used)} images in the feature cache; losses and parameters bitwise equal"
    )
    print(
        f"{'phase':<22}{'steps':>6}{'reference s/step':>18}{'project s/step':>16}{'ratio':>7}"
        f"{'ref cpu':>9}{'proj cpu':>9}"
    )
    rows = [
        ("vision pretrain", "vision", args.vision_steps),
        ("feature cache", "features", 1),
        ("main loop", "main", args.steps),
    ]
    for label, key, n in rows:
        if n:
            r, p = ref.wall[key] / n, new.wall[key] / n
            print(
                f"{label:<22}{n:>6}{r:>18.3f}{p:>16.3f}{r / p:>7.2f}{ref.cpu[key] / n:>9.3f}{new.cpu[key] / n:>9.3f}"
            )
    total_r, total_p = sum(ref.wall.values()), sum(new.wall.values())
    print(f"speedup {total_r / total_p:.2f}")


if __name__ == "__main__":
    main()

"""Model inputs of the embedded LVLM's training batches, without the processor's per-batch work.

``processor(text=..., images=..., padding=True)`` followed by the model's own 3-D rope
positions is what a training step needs. Done naively, every step re-renders the chat template
through Jinja, re-preprocesses every image, and the model rebuilds the rope positions in a Python
loop per row and per image. Each function here computes one of those pieces from what is
already known (the images' grids, the template's fixed text), and is checked against the
original in ``tests/test_embedded.py`` (equal tensors, equal strings):

* :class:`PromptRenderer` -- the chat template rendered once per number of demonstrations with
  sentinels in place of the texts, then filled in;
* :func:`tokenize_prompts` -- the processor's token ids, attention mask and token types for
  images of known grids;
* :func:`rope_positions` -- Qwen2.5-VL's ``get_rope_index`` positions, vectorised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from icdrl.lvlm.prompt import build_messages


class PromptRenderer:
    """``processor.apply_chat_template(build_messages(demos, query, answer), tokenize=False)``, fast.

    The template is rendered once per (number of demonstrations, with or without an answer) with
    sentinel strings as the texts; a prompt is then the pieces between them joined with its
    texts. The first prompt of each layout is also rendered the slow way and must match, else
    (a template that alters its texts) every prompt is rendered the slow way.
    """

    def __init__(self, processor):
        self.processor = processor
        self._pieces: dict[tuple[int, bool], list[str] | None] = {}

    def _render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False)

    @staticmethod
    def _texts(messages: list[dict]) -> list[str]:
        return [
            part["text"] for m in messages for part in m["content"] if part.get("type") == "text"
        ]

    def _skeleton(self, messages: list[dict]) -> list[str] | None:
        n = len(self._texts(messages))
        marks = iter([f"\ue000{i}\ue001" for i in range(n)])
        sentinel = [
            {
                **m,
                "content": [
                    {**part, "text": next(marks)} if part.get("type") == "text" else part
                    for part in m["content"]
                ],
            }
            for m in messages
        ]
        text = self._render(sentinel)
        pieces = []
        for i in range(n):
            mark = f"\ue000{i}\ue001"
            if text.count(mark) != 1:
                return None
            head, text = text.split(mark)
            pieces.append(head)
        pieces.append(text)
        return pieces

    def __call__(self, demos, query, answer: str | None = None) -> str:
        messages = build_messages(demos, query, answer=answer)
        key = (len(demos), answer is not None)
        if key not in self._pieces:
            pieces = self._skeleton(messages)
            real = self._render(messages)
            if pieces is not None and self._fill(pieces, messages) != real:
                pieces = None
            self._pieces[key] = pieces
            return real
        pieces = self._pieces[key]
        return self._render(messages) if pieces is None else self._fill(pieces, messages)

    def _fill(self, pieces: list[str], messages: list[dict]) -> str:
        texts = self._texts(messages)
        return "".join(p + t for p, t in zip(pieces, texts)) + pieces[-1]


def mm_token_types(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """``processor.create_mm_token_type_ids`` as one tensor op: 1 image, 2 video, 3 audio, 0 text."""
    types = torch.zeros_like(input_ids)
    for code, name in ((1, "image_token_ids"), (2, "video_token_ids"), (3, "audio_token_ids")):
        ids = [i for i in (getattr(processor, name, None) or []) if i is not None]
        if ids:
            types[torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype))] = code
    return types


def tokenize_prompts(processor, texts: Sequence[str], image_grid_thw: torch.Tensor) -> dict:
    """``processor(text=texts, images=..., padding=True)`` without its image part, for known grids.

    Each image placeholder is repeated once per merged vision token of its image (grid product
    / merge size squared, in order), as the processor does, then the texts are tokenised with
    the tokenizer's padding: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``.
    """
    merge = processor.image_processor.merge_size**2
    counts = (image_grid_thw.prod(-1) // merge).tolist()
    mark = processor.image_token
    n_marks = sum(t.count(mark) for t in texts)
    if n_marks != len(counts):
        raise ValueError(
            f"tokenize_prompts: {len(counts)} image grids for {n_marks} image placeholders"
        )
    it = iter(counts)
    expanded = []
    for text in texts:
        head, *rest = text.split(mark)
        expanded.append(head + "".join(mark * next(it) + piece for piece in rest))
    enc = processor.tokenizer(expanded, padding=True, return_tensors="pt")
    out = {k: enc[k] for k in ("input_ids", "attention_mask")}
    out["mm_token_type_ids"] = mm_token_types(processor, out["input_ids"])
    return out


def rope_positions(
    mm_token_type_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor,
    spatial_merge_size: int,
) -> torch.Tensor:
    """Qwen2.5-VL's 3-D rope position ids [3, B, L] of image-and-text rows, as ``get_rope_index``.

    Text tokens count up (the same id in all three components); an image's tokens get its start
    position plus their (frame, row, column) in the merged grid, and the text after it resumes
    at start + max(rows, columns); padding gets 0. Images are the runs of image tokens, in
    row-major order (the order of ``image_grid_thw``); each run must hold exactly its grid's
    tokens. Videos are not supported.
    """
    valid = attention_mask.bool()
    if ((mm_token_type_ids > 1) & valid).any():
        raise ValueError("rope_positions: only text and image tokens are supported")
    img = (mm_token_type_ids == 1) & valid
    b, n = img.shape
    before = torch.zeros_like(img)
    before[:, 1:] = img[:, :-1]
    first = img & ~before  # the first token of each image
    if int(first.sum()) != len(image_grid_thw):
        raise ValueError(
            f"rope_positions: {int(first.sum())} images in the tokens, {len(image_grid_thw)} grids"
        )
    which = (torch.cumsum(first.reshape(-1).long(), 0).reshape(b, n) - 1).clamp_min(
        0
    )  # image of each token
    col = torch.arange(n).expand(b, n)
    k = col - col[first][which]  # index within its image
    t = image_grid_thw[:, 0][which]
    h = image_grid_thw[:, 1][which] // spatial_merge_size
    w = image_grid_thw[:, 2][which] // spatial_merge_size
    size = t * h * w
    last = img & (k == size - 1)
    if int(last.sum()) != len(image_grid_thw) or bool((img & (k >= size)).any()):
        raise ValueError("rope_positions: an image's token run does not match its grid")
    advance = torch.where(img, torch.where(last, torch.maximum(h, w), 0), valid.long())
    start = torch.cumsum(advance, 1) - advance  # text position reached before each token
    pos = start.expand(3, b, n).clone()
    offset = torch.stack([k // (h * w), (k // w) % h, k % w])
    pos += torch.where(img, offset, 0)
    pos[:, ~valid] = 0
    return pos

"""Turn dataset records into packed training rows.

Each example is `request_text(tokenizer, prompt) + completion + EOS` (kat_core.chat: the base's chat template
when it has one). Loss weights: 0 on the prompt (we do not teach the model to write requests), 1 on the
completion, `mode_token_weight` on the *decision*: the judge's verdict word (`: think` / `: direct`, where the
choice is made: everything after it follows from it) and the mode token `<think_on>`/`<think_off>` (alone, in a
record without a judge), and 0 on the closing `</answer>` and EOS of a record whose answer was `cut` short (a
self-replay answer that ran out of its token budget: the model should keep the base's words, not learn to stop
where the budget did). A record marked `judge_context` weighs 0 from its completion's start through the mode token:
its judge is context to answer under, not a text to learn (kat_core.train.coldstart.misread_copies).
Examples are packed first-fit into rows of `seq_len` tokens without being split;
position ids restart at each example, which transformers turns into a block-diagonal causal mask (examples in
one row do not see each other).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from kat_core.chat import request_text
from kat_core.format import ANSWER_CLOSE, JUDGE_CLOSE, THINK_OFF, THINK_ON

# the judge's verdict word and the mode token after it: "...carries: think</judge><think_on>"
_DECISION = re.compile(rf":\s*(\w+){re.escape(JUDGE_CLOSE)}\s*(?:{re.escape(THINK_ON)}|{re.escape(THINK_OFF)})")


@dataclass
class Example:
    ids: list[int]
    weights: list[float]  # weight of predicting ids[i] (so weights[0] is unused)


def decision_span(completion: str) -> tuple[int, int] | None:
    """Character span of the completion's decision: from its judge's verdict word to the end of the mode token
    (None without a judge's verdict)."""
    m = _DECISION.search(completion)
    return (m.start(1), m.end()) if m else None


def encode_example(record: dict[str, Any], tokenizer, mode_token_weight: float = 1.0) -> Example:
    prompt_ids = tokenizer(request_text(tokenizer, record["prompt"]), add_special_tokens=False)["input_ids"]
    encoded = tokenizer(record["completion"], add_special_tokens=False, return_offsets_mapping=True)
    completion_ids = encoded["input_ids"]
    ids = prompt_ids + completion_ids + [tokenizer.eos_token_id]
    mode_ids = {tokenizer.convert_tokens_to_ids(THINK_ON), tokenizer.convert_tokens_to_ids(THINK_OFF)}
    lo, hi = decision_span(record["completion"]) or (0, 0)
    if record.get("judge_context"):
        if not hi:
            raise ValueError(f"record {record.get('id')} is marked judge_context but has no judge verdict")
        lo, mode_token_weight = 0, 0.0  # the whole judge and the mode token: context only
    weights = [0.0] * len(prompt_ids) + [
        mode_token_weight if t in mode_ids or (start < hi and end > lo) else 1.0
        for t, (start, end) in zip(completion_ids, encoded["offset_mapping"], strict=True)
    ] + [1.0]
    if record.get("cut"):
        if completion_ids[-1:] != [tokenizer.convert_tokens_to_ids(ANSWER_CLOSE)]:
            raise ValueError(f"record {record.get('id')} is marked cut but does not end with {ANSWER_CLOSE}")
        weights[-2:] = [0.0, 0.0]
    return Example(ids, weights)


@dataclass
class PackedRows:
    input_ids: list[list[int]]
    position_ids: list[list[int]]
    weights: list[list[float]]
    segment_ids: list[list[int]]  # which example of the row each token belongs to (-1: padding)
    dropped: int  # examples longer than a row
    members: list[list[int]]  # each row's examples (indices into the input), in order


def pack(examples: list[Example], seq_len: int, pad_id: int, seed: int = 0) -> PackedRows:
    """First-fit packing in a seeded shuffled order; the tail of each row is padding with weight 0."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    room: list[int] = []
    dropped = 0
    for i in order:
        ex = examples[i]
        if len(ex.ids) > seq_len:
            dropped += 1
            continue
        for r, free in enumerate(room):
            if free >= len(ex.ids):
                rows[r].append(i)
                room[r] -= len(ex.ids)
                break
        else:
            rows.append([i])
            room.append(seq_len - len(ex.ids))
    out = PackedRows([], [], [], [], dropped, rows)
    for row in rows:
        ids, pos, w, seg = [], [], [], []
        for k, ex in enumerate(examples[i] for i in row):
            ids += ex.ids
            pos += list(range(len(ex.ids)))
            seg += [k] * len(ex.ids)
            w += [0.0] + ex.weights[1:]  # the first token of an example is not predicted from the previous one
        pad = seq_len - len(ids)
        # padding continues the positions so it forms no new "sequence start" inside the row
        out.input_ids.append(ids + [pad_id] * pad)
        out.position_ids.append(pos + list(range(pos[-1] + 1, pos[-1] + 1 + pad)))
        out.segment_ids.append(seg + [-1] * pad)
        out.weights.append(w + [0.0] * pad)
    return out

"""Retention: twenty plain questions a small instruct model answers, asked before and after fine-tuning, to see
what a pretrained base keeps of itself once it has learned AutoThink.

    kat eval BASE --suites retention --modes plain        # what the base knows
    kat eval compare BASE TUNED --suites retention --modes plain   # head to head: the share it kept

The questions are everyday facts, written for this project. One test split of 20 items, no training split (it
must never be trained on). A response is right when it names an accepted answer (whole words, case and
punctuation ignored) and none of the item's wrong candidates: a hedge that lists several candidates ("Paris,
London or Rome") is wrong, so listing answers cannot pass.
"""

from __future__ import annotations

import random
import re
from typing import Any

from kat_core.tasks.base import Item, Task, register

# (question, accepted answers, wrong candidates a hedge would name)
QUESTIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",), ("london", "berlin", "madrid", "rome")),
    ("What is the largest planet in our solar system?", ("jupiter",), ("saturn", "earth", "neptune", "mars")),
    ("How many days are there in a week?", ("seven", "7"), ("five", "six", "eight", "5", "6", "8")),
    ("What color is the sky on a clear day?", ("blue",), ("green", "red", "yellow")),
    ("What is the chemical formula of water?", ("h2o",), ("co2", "o2", "h2o2")),
    ("Which animal is called the king of the jungle?", ("lion",), ("tiger", "elephant", "gorilla")),
    ("At how many degrees Celsius does water freeze?", ("0", "zero"), ("100", "10")),
    ("How many legs does a spider have?", ("eight", "8"), ("six", "ten", "6", "10")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",), ("dickens", "austen", "tolstoy")),
    ("What is the opposite of hot?", ("cold",), ("warm", "wet")),
    ("What is the capital of Japan?", ("tokyo",), ("kyoto", "osaka", "beijing", "seoul")),
    ("Which gas do plants take in from the air to make food?", ("carbon dioxide", "co2"), ("nitrogen", "helium")),
    ("What is the largest ocean on Earth?", ("pacific",), ("atlantic", "indian", "arctic")),
    ("What is 10 times 10?", ("100", "one hundred"), ("1000", "20", "110")),
    ("Which planet is known as the Red Planet?", ("mars",), ("venus", "jupiter", "mercury")),
    ("What language do people speak in Spain?", ("spanish",), ("portuguese", "french", "italian")),
    ("What sweet food do bees make?", ("honey",), ("milk", "silk", "sugar")),
    ("How many hours are there in a day?", ("24", "twenty-four", "twenty four"), ("12", "48", "twelve")),
    ("What is the capital of Italy?", ("rome",), ("milan", "venice", "naples", "paris")),
    ("What is the boiling point of water in degrees Celsius?", ("100", "one hundred"), ("50", "90", "212")),
)


def _words(text: str) -> str:
    """Lower case, punctuation as spaces (a decimal point inside a number kept), one space between words. A
    hyphen separates too: "a 7-day week" names 7, and "twenty-four" reads as "twenty four" on both sides."""
    text = re.sub(r"[^\w.]+|(?<!\w)\.|\.(?!\w)", " ", text.lower())
    return f" {' '.join(text.split())} "


def _names(text: str, phrase: str) -> bool:
    return f" {' '.join(_words(phrase).split())} " in text


@register("retention")
class RetentionTask(Task):
    name = "retention"
    splits = ("test",)

    def __init__(self, **_: Any):  # the options other families take (benchmarks_dir, levels): nothing to read
        pass

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Item]:
        self._check_split(split)
        items = [Item(id=f"retention-{k}", family=self.name, prompt=q, answer=accepted[0], difficulty=1,
                      meta={"accepted": list(accepted), "wrong": list(wrong)})
                 for k, (q, accepted, wrong) in enumerate(QUESTIONS)]
        return items if n is None or n >= len(items) else random.Random(seed).sample(items, n)

    def verify(self, item: Item, answer_text: str) -> bool:
        text = _words(answer_text or "")
        accepted = item.meta.get("accepted") or [item.answer]
        return any(_names(text, a) for a in accepted) and not any(_names(text, w) for w in item.meta.get("wrong", []))

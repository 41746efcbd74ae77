"""The majority-vote cold start: labels come from the model's own forced samples."""

import json
import os
import subprocess
import sys

import pytest

from kat_core.train.coldstart import label_items, majority_vote, summarize

# a smoke-sized model that learns enough in two minutes to make the vote meaningful: levels 1 and 5 only, on
# enough items that it cannot simply memorise the training prompts the cold start labels
SETTINGS = [
    "synth.levels=[1,5]", "synth.families={arith: 1000}", "model.hidden_size=128", "model.num_heads=4",
    "model.intermediate_size=256", "train.steps=400", "train.lr=3e-3", "train.weight_decay=0.1",
    "train.micro_batch_size=16",
    "train.checkpoint_every=300", "coldstart.prompts=60", "coldstart.temperature=0.3", "coldstart.train.steps=10",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def kat(*args):
    sets = [x for s in SETTINGS for x in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "kat_app.cli", *map(str, args), "-q", *sets],
                          capture_output=True, text=True, env=ENV, timeout=900)


def test_majority_vote_rule():
    assert majority_vote(1.0, 1.0, 0.1)[0] == "off"
    assert majority_vote(0.75, 0.8, 0.1)[0] == "off"  # within delta
    assert majority_vote(0.75, 1.0, 0.1)[0] == "on"  # think-on clearly better
    assert majority_vote(0.5, 0.0, 0.1)[0] == "on"  # a tie is not a majority
    assert majority_vote(0.0, 0.0, 0.1)[0] == "on"


def test_labels_follow_the_samples_not_the_level():
    from kat_core.tasks.arith import ArithTask

    task = ArithTask()
    items = [i for i in task.examples("train", n=50) if i.difficulty in (1, 5)][:2]
    sampled = [  # the easy item fails directly and the hard one succeeds: the labels must say so
        {"acc_off": 0.25, "acc_on": 1.0, "tokens_off": 9, "tokens_on": 30, "best_off": None,
         "best_on": {"think": "x", "answer": items[0].answer}},
        {"acc_off": 1.0, "acc_on": 1.0, "tokens_off": 9, "tokens_on": 80,
         "best_off": {"think": None, "answer": items[1].answer}, "best_on": None},
    ]
    labels, sft = label_items([(task, items[0]), (task, items[1])], sampled, delta=0.1)
    assert [r["label"] for r in labels] == ["on", "off"]
    assert [r["mode"] for r in sft] == ["on", "off"]
    assert summarize(labels)["prompts"] == 2


@pytest.mark.slow
def test_coldstart_on_a_quickly_trained_model(tmp_path):
    assert kat("data", "synth", "--out", tmp_path / "data").returncode == 0
    r = kat("train", "pretrain", "--data", tmp_path / "data", "--out", tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    r = kat("train", "coldstart", "--model", tmp_path / "ckpt", "--out", tmp_path / "cs")
    assert r.returncode == 0, r.stderr
    labels = [json.loads(line) for line in (tmp_path / "cs" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 60
    for row in labels:  # every label is the vote over the row's own measured accuracies
        assert row["label"] == majority_vote(row["acc_off"], row["acc_on"], 0.1)[0]
    level1 = [r for r in labels if r["difficulty"] == 1]
    level5 = [r for r in labels if r["difficulty"] == 5]
    assert sum(r["label"] == "off" for r in level1) > len(level1) / 2
    assert sum(r["label"] == "on" for r in level5) > len(level5) / 2
    # measured, not assigned: accuracies vary within a level
    assert len({r["acc_off"] for r in level1 + level5}) > 2
    summary = json.loads((tmp_path / "cs" / "coldstart.json").read_text())
    assert set(summary["per_level"]) == {"1", "5"}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "cs")

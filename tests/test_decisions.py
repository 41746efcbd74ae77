"""The cold start's decision alignment (kat_core.train.decisions): which cells disagree, and that aligning moves
the disagreeing cell's decision while the others hold theirs."""

from __future__ import annotations

import pytest

from kat_core.autothink import CellTally, cell_of
from kat_core.tasks.arith import ArithTask
from kat_core.train.decisions import align, disagreements, log_odds, thinks_per_cell
from tests.tiny_autothink import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def tally_of(verdicts: dict[str, str], n: int = 8) -> CellTally:
    """A tally whose cells measured clear verdicts: 'off' (+0.3 for think-off each prompt) or 'on' (-0.3)."""
    tally = CellTally(min_cell=1)
    for cell, verdict in verdicts.items():
        for _ in range(n):
            tally.add(cell, 4, 0.3 if verdict == "off" else -0.3)
    return tally


def test_a_cell_disagrees_when_most_of_its_prompts_are_decided_against_its_verdict():
    tally = tally_of({"A": "off", "B": "on", "C": "off", "D": "on"})
    thinks = {"A": 0.9, "B": 0.9, "C": 0.5, "D": 0.4}  # C: half think, its majority is think-off
    assert disagreements(tally, thinks) == {"A": "on -> off", "D": "off -> on"}
    assert disagreements(tally, {"A": 0.1, "B": 1.0}) == {}


def test_aligning_moves_the_disagreeing_cell_and_holds_the_others(tiny_tokenizer, tmp_path_factory):
    from kat_core.model.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_checkpoint(tmp_path_factory.getbasetemp(), tiny_tokenizer))
    task = ArithTask(levels=[1, 3, 4])
    pairs = [(task, it) for it in task.examples("pool", n=90)]
    before = thinks_per_cell(model, tok, pairs)
    cells = sorted(before, key=lambda c: -sum(cell_of(task.intent_features(it)) == c for _, it in pairs))[:3]
    pairs = [(t, it) for t, it in pairs if cell_of(t.intent_features(it)) in cells]
    moving, held = cells[0], cells[1:]
    # the moving cell's verdict is the opposite of what the model decides there; the others' what it decides
    verdicts = {c: ("on" if before[c] > 0.5 else "off") for c in held}
    verdicts[moving] = "off" if before[moving] > 0.5 else "on"
    tally = tally_of(verdicts)
    disagree = disagreements(tally, {c: before[c] for c in cells})
    assert list(disagree) == [moving]
    start = log_odds(model, tok, pairs)

    steps, after = align(model, tok, pairs, tally, disagree, steps=60, lr=3e-3, seed=0)

    assert disagreements(tally, after) == {}, (before, after)
    assert steps < 60 and steps % 5 == 0  # stopped at the first check where every cell decided its verdict
    assert (after[moving] > 0.5) == (verdicts[moving] == "on")
    end = log_odds(model, tok, pairs)
    in_held = [cell_of(t.intent_features(it)) in held for t, it in pairs]
    drift = [abs(e - s) for e, s, h in zip(end, start, in_held, strict=True) if h]
    moved = [abs(e - s) for e, s, h in zip(end, start, in_held, strict=True) if not h]
    # the held cells' log-odds stay near where they were, far nearer than the moved cell's went
    assert max(drift) < min(moved), (drift, moved)

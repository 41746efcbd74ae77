import random

import pytest

from kat_core.errors import KatError
from kat_core.tasks.arith import (
    LEVELS,
    ArithTask,
    _level_expression,
    carries,
    check_step,
    make_item,
    solve,
    split_of,
    work_steps,
)


def test_traces_are_right_and_end_in_the_answer():
    rng = random.Random(1)
    for level in LEVELS:
        for _ in range(200):
            expr, _ = _level_expression(level, rng)
            value, steps = solve(expr)
            assert value == eval(expr)  # noqa: S307 - our own generated digits and operators
            assert all(check_step(s) for s in steps), (expr, steps)
            assert steps[-1].endswith(f"={value}")


def test_levels_grade_in_what_a_direct_answer_must_do_silently():
    task = ArithTask()
    items = task.examples("train", n=500)
    by_level = {lvl: [i for i in items if i.difficulty == lvl] for lvl in LEVELS}
    # levels 1-3 carry nothing (every digit is one fact), level 4 always carries, level 5 is the longest
    assert all(carries(i.steps) == 0 for lvl in (1, 2, 3) for i in by_level[lvl])
    assert all(carries(i.steps) > 0 for i in by_level[4])
    mean_steps = {lvl: sum(len(i.steps) for i in its) / len(its) for lvl, its in by_level.items()}
    assert all(mean_steps[lvl] >= 3 for lvl in LEVELS)  # thinking costs tokens at every level
    assert mean_steps[5] > max(mean_steps[lvl] for lvl in (1, 2, 3, 4))


def test_level_operands():
    for item in ArithTask(levels=[1]).examples("train", n=50):
        a, b = item.meta["operands"]
        assert 10 <= a < 100 and b < 10 and item.meta["ops"] in (["+"], ["-"])
    for item in ArithTask(levels=[2]).examples("train", n=50):
        a, b = item.meta["operands"]
        assert 10 <= a < 100 and b % 10 == 0 and 10 <= b < 100 and item.meta["ops"] in (["+"], ["-"])
    for item in ArithTask(levels=[3]).examples("train", n=50):
        a, b = item.meta["operands"]
        assert 10 <= a < 100 and 10 <= b < 100 and item.meta["ops"] in (["+"], ["-"])
    products = ArithTask(levels=[5]).examples("train", n=100)
    for item in products:
        assert sorted(len(str(x)) for x in item.meta["operands"][:2]) == [1, 2] and item.meta["ops"][0] == "*"
    assert {len(item.meta["ops"]) for item in products} == {1, 2}  # alone, or plus a two-digit number


def test_the_answer_is_the_value_and_the_judge_names_the_carry():
    from kat_core.data.judge import judge_text

    task = ArithTask()
    plain = task.examples("test", n=50)
    for item in plain:
        assert task.answer_text(item) == item.answer
    carried = next(i for i in plain if i.difficulty == 4)
    no_carry = next(i for i in plain if i.difficulty == 1)
    assert "carries" in judge_text(task.intent_features(carried), "on")
    assert "carries" not in judge_text(task.intent_features(no_carry), "off")
    assert judge_text(task.intent_features(no_carry), "off").endswith(": direct")


def test_the_judge_counts_only_steps_that_compute():
    from kat_core.data.judge import describe

    task = ArithTask()

    def judged(expression: str, level: int) -> str:
        return describe(task.intent_features(make_item(expression, level)))

    # the tens of 47+2 only copies the 4 down: level 1 reads 2 steps, as the units of 47+20 (level 2) do;
    # level 3 (47+21) 3
    assert judged("47+2", 1) == "sum, 2 steps" and judged("47-3", 1) == "difference, 2 steps"
    assert judged("47+20", 2) == "sum, 2 steps" and judged("47-20", 2) == "difference, 2 steps"
    assert judged("47+21", 3) == "sum, 3 steps" and judged("47-23", 3) == "difference, 3 steps"
    assert work_steps(solve("48+5")[1]) == 3  # a carry into the tens is work, not a copy
    assert work_steps(solve("43+50")[1]) == 2  # a copied units column is not work either
    # a result shorter or longer than the operands is named (the digit a direct answer drops or adds);
    # products always grow and are not
    assert judged("66-61", 3) == "difference, 3 steps, 1-digit result"
    assert judged("47-40", 2) == "difference, 2 steps, 1-digit result"
    assert judged("23+85", 3) == "sum, 3 steps, 3-digit result"
    assert judged("47*6", 5) == describe({**task.intent_features(make_item("47*6", 5)), "result_digits": None})


def test_splits_are_disjoint_and_deterministic():
    task = ArithTask()
    train, test, pool = task.examples("train", n=2000), task.examples("test"), task.examples("pool", n=500)
    assert not {i.prompt for i in train} & {i.prompt for i in test}
    assert not {i.prompt for i in pool} & ({i.prompt for i in train} | {i.prompt for i in test})
    assert all(split_of(i.meta["expression"]) == "test" for i in test)
    assert {i.difficulty for i in pool} == {1, 2, 3, 4, 5}
    assert [i.id for i in task.examples("train", n=50, seed=3)] == [i.id for i in task.examples("train", n=50, seed=3)]
    assert [i.id for i in task.examples("train", n=50, seed=3)] != [i.id for i in task.examples("train", n=50, seed=4)]
    assert len({i.prompt for i in train}) == len(train)


def test_verify_reads_the_last_integer():
    task = ArithTask()
    item = task.examples("test", n=1)[0]
    assert task.verify(item, item.answer)
    assert task.verify(item, f"so the result is {item.answer}.")
    assert not task.verify(item, str(int(item.answer) + 1))
    assert not task.verify(item, "")


def test_check_step_rejects_slips():
    assert check_step("7+8=15 w5 c1")
    assert not check_step("7+8=16 w6 c1")
    assert not check_step("7+8=15 w5 c0")
    assert not check_step("7+8=15 w4 c1")
    assert check_step("12-7=5 w5 b1")
    assert not check_step("nonsense")


def test_unknown_split_is_a_readable_error():
    with pytest.raises(KatError, match="no split"):
        ArithTask().examples("validation")


def test_a_product_column_adds_its_carry_in_its_own_step():
    # the digit product, then the carry: the fused `4*6+4=28` was where the demo student's traces went wrong
    assert solve("47*6") == (282, ["7*6=42 w2 c4", "4*6=24", "24+4=28 w28", "47*6=282"])
    assert solve("6*47") == solve("47*6")
    assert solve("32*3")[1] == ["2*3=6 w6", "3*3=9 w9", "32*3=96"]  # no carry, no extra step


def test_a_large_held_out_pool_is_filled_from_levels_with_room():
    """A held-out split is ~12% of the expression space: 2000 pool items need more tries than the fixed 2000
    misses a level (which left the demo's pool at 776); levels 1-2 run out and hand their share on."""
    from collections import Counter

    from kat_core.tasks.arith import ArithTask, split_of

    items = ArithTask().examples("pool", n=2000, seed=0)
    assert len(items) == len({it.prompt for it in items}) == 2000
    assert all(split_of(it.prompt.removeprefix("Compute ").rstrip(".")) == "pool" for it in items)
    per_level = Counter(it.difficulty for it in items)
    assert per_level[1] < 150 and per_level[2] < 150 and min(per_level[lvl] for lvl in (3, 4, 5)) >= 500

import random

import pytest

from kat_core.errors import KatError
from kat_core.tasks.arith import LEVELS, ArithTask, _level_expression, check_step, solve, split_of


def test_traces_are_right_and_end_in_the_answer():
    rng = random.Random(1)
    for level in LEVELS:
        for _ in range(200):
            expr, _ = _level_expression(level, rng)
            value, steps = solve(expr)
            assert value == eval(expr)  # noqa: S307 - our own generated digits and operators
            assert all(check_step(s) for s in steps), (expr, steps)
            assert steps[-1].endswith(f"={value}")


def test_levels_grade_in_trace_length():
    task = ArithTask()
    items = task.examples("train", n=500)
    mean_steps = {
        lvl: sum(len(i.steps) for i in items if i.difficulty == lvl) / sum(i.difficulty == lvl for i in items)
        for lvl in LEVELS
    }
    # level 1 is one fact; level 5 chains a carried product into a carried sum
    assert mean_steps[1] == 1
    assert mean_steps[5] > max(mean_steps[lvl] for lvl in (1, 2, 3, 4))
    assert all(mean_steps[1] < mean_steps[lvl] for lvl in (2, 3, 4, 5))


def test_level_1_is_one_operation_on_digits():
    for item in ArithTask(levels=[1]).examples("train", n=50):
        a, b = item.meta["operands"]
        assert a < 10 and b < 10 and len(item.meta["ops"]) == 1


def test_splits_are_disjoint_and_deterministic():
    task = ArithTask()
    train, test = task.examples("train", n=2000), task.examples("test")
    assert not {i.prompt for i in train} & {i.prompt for i in test}
    assert all(split_of(i.meta["expression"]) == "test" for i in test)
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

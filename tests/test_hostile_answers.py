"""Adversarial corpus for answer checking: each text must state exactly one answer, the one a grader
would read, so a hedge or a negated number never earns the reward (kat_core.tasks.mathbench)."""

import pytest

from kat_core.tasks.answers import final_answer
from kat_core.tasks.mathbench import verify_math

# gold 70: texts that do not state 70
REJECTED = [
    "the answer is not 70, it is 71",
    "It is 71, not 70",
    "The answer is 71, not 70.",
    "Not 70.",
    "not 70",
    "70? No. 71.",
    "The answer is 70, no wait, 71",
    "The answer isn't 70; it's 71",
    "I would not say 70. 71.",
    "Not 70 but 71",
    "70 is wrong, the answer is 71",
    "70 is incorrect. 71",
    "$70$ is not the answer; the answer is $71$",
    "**71**, not **70**",
    "`71` (not `70`)",
    "It's definitely not **70**",
    "\\boxed{71}, not \\boxed{70}",
    "\\boxed{71}",
    "\\boxed{70",  # an unclosed box states nothing, and no number is picked from around it
    "<answer>71</answer> 70",
    "70 <answer>71</answer>",
    "70 or 71",
    "70, 71",
    "The answer is -70",
    "The answer is 70 - 1",
    "The answer is 700",
    "7",
    "70x",
    "neither 70 nor 69",
    "rather than 70, I get 72",
    "instead of 70 it is 69",
    "The result is 71 (other than 70)",
    "",
    "no answer",
    "**not 70**",
    "The answer is 70. Wait, no, it is 71.",
    "The answer is 70 - wait, 71",
    "70. I mean 71",
    "The answer is 70, no.",
    "\u221270",  # the minus sign
    "The answer is \u221270",
]

ACCEPTED = [
    "70",
    "**70**",
    "`70`",
    "__70__",
    "*70*",
    "The answer is **70**.",
    "The answer is `70`",
    "$70$",
    "\\(70\\)",
    "\\boxed{70}",
    "The final answer is $\\boxed{70}$.",
    "\\boxed{71} then corrected: \\boxed{70}",
    "<answer>70</answer>",
    "<answer>70",
    "The answer is not 71, it is 70",
    "It is 70, not 71",
    "70.",
    "70.0",
    "The answer is 70 because 3 + 4 = 7",
    "So she earns $70 in total.",
    "70 dollars",
    "**$70**",
    "Final answer: 70",
    "The answer is 71 - 1",
    "First 12, then 35, finally 70",
    "Not 71 but 70",
    "The answer is 71. Actually, 70 is right.",
    "No, the answer is 70",
    "The answer is actually 70",
    "The answer is 70, no question about it",
    "The answer is 70. Sorry for the delay.",
]


@pytest.mark.parametrize("text", REJECTED)
def test_texts_that_do_not_state_the_gold_are_rejected(text):
    assert not verify_math("70", text), (text, final_answer(text))


@pytest.mark.parametrize("text", ACCEPTED)
def test_texts_that_state_the_gold_are_accepted(text):
    assert verify_math("70", text), (text, final_answer(text))


@pytest.mark.parametrize(("gold", "text", "ok"), [
    ("\\frac{1}{2}", "not 1/3 but 1/2", True),
    ("\\frac{1}{2}", "1/2, not 1/3", True),
    ("\\frac{1}{3}", "1/2, not 1/3", False),
    ("\\frac{1}{2}", "The answer is $\\frac{1}{2}$, not $\\frac{1}{3}$.", True),
    ("\\frac{1}{3}", "The answer is $\\frac{1}{2}$, not $\\frac{1}{3}$.", False),
    ("1234", "The answer is 1,234.", True),
    ("1234", "The answer is 1,235, not 1,234.", False),
    ("3\\sqrt{13}", "The answer is 3\\sqrt{13}.", True),
    ("3", "The answer is 3\\sqrt{13}.", False),
    ("\\text{Evelyn}", "Evelyn", True),
])
def test_other_golds(gold, text, ok):
    assert verify_math(gold, text) is ok, (gold, text, final_answer(text))


def test_the_one_answer_each_text_states():
    # one answer, never a list of readings: a hedge cannot win whichever number is right
    assert final_answer("the answer is not 70, it is 71") == "71"
    assert final_answer("It is 71, not 70") == "71"
    assert final_answer("**70**") == "70" and final_answer("`70`") == "70"
    assert final_answer("70 or 71") == "71"
    assert final_answer("not 70") is None
    assert final_answer("The answer isn't 70; it's 71") == "71"
    assert final_answer("instead of 70 it is 69") == "69"


@pytest.mark.skipif(not any((d / "aime24_test.jsonl").is_file() for d in __import__(
    "kat_core.tasks.paths", fromlist=["candidate_dirs"]).candidate_dirs()), reason="benchmark files not found")
def test_every_aime_item_rejects_the_negated_gold_and_accepts_formatted_gold():
    from kat_core.tasks.mathbench import AIME24

    task = AIME24()
    items = task.examples()
    assert len(items) == 30
    for item in items:
        gold, other = item.answer, str(int(item.answer) + 1)
        for text in (f"the answer is not {gold}, it is {other}", f"It is {other}, not {gold}"):
            assert not task.verify(item, text), (item.id, text)
        for text in (f"**{gold}**", f"`{gold}`", f"the answer is not {other}, it is {gold}"):
            assert task.verify(item, text), (item.id, text)


def test_arithmetic_reads_the_stated_answer_too():
    from kat_core.tasks.arith import ArithTask, make_item

    task, item = ArithTask(), make_item("61-6", 3)  # 55
    for text in ("55", "= 55.", "61-6=55", "The answer is 55", "**55**", "It is 55, not 54"):
        assert task.verify(item, text), text
    for text in ("It is 54, not 55", "the answer is not 55, it is 54", "not 55", "55 or 54", "54"):
        assert not task.verify(item, text), text

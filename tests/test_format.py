from hypothesis import given
from hypothesis import strategies as st

from kat_core.format import (
    SPECIAL_TOKENS,
    Response,
    count_tokens,
    forced_prefix,
    parse,
    render,
    render_response,
    token_segments,
)

# text that contains no grammar tag (tags are reserved)
plain = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda s: not any(t in s for t in SPECIAL_TOKENS)
)


@st.composite
def responses(draw):
    mode = draw(st.sampled_from(["on", "off"]))
    return Response(
        judge=draw(plain), mode=mode, answer=draw(plain), think=draw(plain) if mode == "on" else None
    )


@given(responses())
def test_parse_inverts_render(r):
    parsed = parse(render_response(r))
    assert parsed.well_formed, parsed.error
    assert parsed.response() == r


@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text):
    parsed = parse(text)
    assert parsed.well_formed in (True, False)
    if not parsed.well_formed:
        assert parsed.error


@given(st.lists(st.sampled_from([*SPECIAL_TOKENS, "x", " ", "42"]), max_size=30))
def test_tag_soup_never_raises(parts):
    parse("".join(parts))


def test_think_on_fields_and_spans():
    text = render("hard: carries", "on", "85", think="7+8=15 w5 c1")
    p = parse(text)
    assert (p.judge, p.mode, p.think, p.answer, p.well_formed) == ("hard: carries", "on", "7+8=15 w5 c1", "85", True)
    assert text[slice(*p.spans["think"])] == "7+8=15 w5 c1"
    assert text[slice(*p.spans["judge_segment"])] == "<judge>hard: carries</judge><think_on>"
    assert text[slice(*p.spans["response_segment"])] == "<think>7+8=15 w5 c1</think><answer>85</answer>"


def test_think_off_has_no_think():
    p = parse("<judge>easy</judge><think_off><answer>9</answer>")
    assert p.well_formed and p.mode == "off" and p.think is None and p.answer == "9"


def test_missing_final_close_is_tolerated():
    p = parse("<judge>easy</judge><think_off><answer>9")
    assert p.well_formed and p.answer == "9"


def test_forced_prefix_continues_into_a_response():
    assert parse(forced_prefix("j", "off") + "<answer>3</answer>").mode == "off"


def test_malformed_outputs_are_reported():
    cases = {
        "<judge>x</judge><answer>1</answer>": "mode",
        "<judge>x</judge><think_on><answer>1</answer>": "<think>",
        "<judge>x</judge><think_off><think>a</think><answer>1</answer>": "<answer>",
        "<judge>x<think_off><answer>1</answer>": "</judge>",
        "<judge>x</judge><think_on><think>unfinished": "</think>",
        "hello <judge>x</judge><think_off><answer>1</answer>": "before",
        "<judge>x</judge><think_off><answer>1</answer> trailing": "after",
        "": "empty",
    }
    for text, hint in cases.items():
        p = parse(text)
        assert not p.well_formed, text
        assert hint in p.error, (text, p.error)


def test_response_rejects_inconsistent_fields():
    import pytest

    with pytest.raises(ValueError):
        Response(judge="j", mode="off", answer="1", think="t")
    with pytest.raises(ValueError):
        Response(judge="j", mode="on", answer="1")
    with pytest.raises(ValueError):
        Response(judge="<answer>", mode="off", answer="1")


def test_token_segments_follow_the_tags():
    tags = {t: 100 + i for i, t in enumerate(SPECIAL_TOKENS)}
    j, jc, on, _off, t, tc, a, ac = (tags[x] for x in SPECIAL_TOKENS)
    ids = [j, 1, 2, jc, on, t, 3, 4, 5, tc, a, 6, ac, 0]
    assert token_segments(ids, tags) == (
        ["judge"] * 5 + ["think"] * 5 + ["answer"] * 3 + ["other"]
    )


def test_count_tokens_with_a_real_tokenizer(tiny_tokenizer):
    text = render("easy", "on", "85", think="7+8=15")
    counts = count_tokens(text, tiny_tokenizer)
    # digits are one token each: "85" -> 2 tokens + 2 answer tags
    assert counts["answer"] == 4
    assert counts["judge"] + counts["think"] + counts["answer"] + counts["other"] == counts["total"]
    assert counts["think"] >= len("7+8=15") // 2 + 2

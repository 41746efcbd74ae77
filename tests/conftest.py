import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE trained on a little arithmetic text: fast enough to build once per test session."""
    from kat_core.tasks.arith import ArithTask
    from kat_core.tokenizer import train_tokenizer

    items = ArithTask().examples("train", n=200)
    corpus = [f"{i.prompt} {' '.join(i.steps)}" for i in items] + ["simple, answer directly"] * 5
    return train_tokenizer(corpus, vocab_size=300)

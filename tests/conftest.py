import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE trained on a little arithmetic text: fast enough to build once per test session."""
    from kat_core.tasks.arith import ArithTask
    from kat_core.tokenizer import train_tokenizer

    items = ArithTask().examples("train", n=200)
    corpus = [f"{i.prompt} {' '.join(i.steps)}" for i in items] + ["simple, answer directly"] * 5
    return train_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def one_thread():
    """Ops this small run fastest on one thread, and far more predictably on a busy 2-core machine.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

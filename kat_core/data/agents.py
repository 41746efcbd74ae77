"""The multi-agent synthesis of think-on examples: a solver drafts, a thinker writes the step-by-step
reasoning, a critic verifies the final answer against ground truth and checks each step.

Two backends share the `Agents` interface:
- `ProgrammaticAgents`: built in. The solver drafts from the task's reference trace and, at a
  configurable rate, injects an error (a wrong step or a wrong final answer) so the critic has real
  work and its catch rate can be measured.
- `OpenAIAgents`: any OpenAI-compatible chat-completions endpoint plays solver, thinker and critic.
In both, the final answer is verified with the task's own verifier; that check is never delegated.
"""

from __future__ import annotations

import os
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from kat_core.config import OpenAIAgentConfig
from kat_core.errors import KatError
from kat_core.tasks.base import Item, Task


@dataclass
class Draft:
    steps: list[str]
    answer: str
    injected: str | None = None  # programmatic backend: which error was planted ("step" | "answer")


@dataclass
class Verdict:
    ok: bool
    reason: str | None = None  # "wrong_answer" | "bad_step" | "critic_rejected" | "no_answer"


class Agents(ABC):
    """Solver, thinker and critic. Subclasses implement `draft`, `think` and `critique_steps`."""

    @abstractmethod
    def draft(self, task: Task, item: Item, rng: random.Random) -> Draft: ...

    @abstractmethod
    def think(self, task: Task, item: Item, draft: Draft) -> str: ...

    @abstractmethod
    def critique_steps(self, task: Task, item: Item, think: str) -> bool:
        """Whether every reasoning step holds (the answer itself is checked by the task verifier)."""

    def critic(self, task: Task, item: Item, think: str, answer: str) -> Verdict:
        if not answer.strip():
            return Verdict(False, "no_answer")
        if not task.verify(item, answer):
            return Verdict(False, "wrong_answer")
        if not self.critique_steps(task, item, think):
            return Verdict(False, "bad_step")
        return Verdict(True)


def _steps_hold(task: Task, think: str) -> bool | None:
    """Check every line of `think` with the task's own step checker; None when the task has none."""
    check = getattr(task, "check_step", None)
    if check is None:
        return None
    lines = [ln for ln in think.splitlines() if ln.strip()]
    return bool(lines) and all(check(ln) for ln in lines)


class ProgrammaticAgents(Agents):
    def __init__(self, error_rate: float = 0.15):
        self.error_rate = error_rate

    def draft(self, task: Task, item: Item, rng: random.Random) -> Draft:
        steps, answer = list(item.steps), task.answer_text(item)
        if not steps or rng.random() >= self.error_rate:
            return Draft(steps, answer)
        if rng.random() < 0.5:  # a wrong intermediate value, the kind of slip a solver makes
            i = rng.randrange(len(steps))
            steps[i] = _corrupt_number(steps[i], rng)
            return Draft(steps, answer, injected="step")
        return Draft(steps, _corrupt_last_number(answer, rng), injected="answer")

    def think(self, task: Task, item: Item, draft: Draft) -> str:
        return "\n".join(draft.steps)

    def critique_steps(self, task: Task, item: Item, think: str) -> bool:
        held = _steps_hold(task, think)
        return True if held is None else held


def _corrupt_last_number(answer: str, rng: random.Random) -> str:
    """A wrong final answer: the last number moved by a small amount (`320` -> `321`), never below zero (a
    negative shift folded back could land on the right value, an "error" no critic can catch)."""
    numbers = list(re.finditer(r"\d+", answer))
    if not numbers:
        return answer + "0"
    m = numbers[-1]
    value = int(m[0])
    wrong = rng.choice([value + d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0])
    return answer[: m.start()] + str(wrong) + answer[m.end():]


def _corrupt_number(step: str, rng: random.Random) -> str:
    """Change the value after the first '=' of a step (e.g. `7+8=15 w5 c1` -> `7+8=16 w5 c1`)."""
    m = re.search(r"=(\d+)", step)
    if not m:
        return step + "1"
    value = int(m[1])
    wrong = value + rng.choice([-1, 1, 2]) if value > 1 else value + 1
    return step[: m.start(1)] + str(wrong) + step[m.end(1):]


_SOLVER = (
    "Solve the problem. Show the working, one short step per line, then a last line "
    "'Answer: <final answer only>'."
)
_THINKER = (
    "Rewrite the solution below as concise step-by-step reasoning, one step per line. "
    "Do not state the final answer on its own line."
)
_CRITIC = (
    "You check reasoning. Reply with exactly VALID if every step below is correct, otherwise "
    "INVALID: <the first wrong step>."
)


class OpenAIAgents(Agents):
    """Solver, thinker and critic played by a model behind an OpenAI-compatible endpoint."""

    def __init__(self, config: OpenAIAgentConfig):
        from openai import OpenAI

        base_url = config.base_url or os.environ.get("OPENAI_BASE_URL")
        self.model = config.model or os.environ.get("KAT_AGENT_MODEL")
        if not base_url or not self.model:
            raise KatError(
                "the openai agent backend needs an endpoint and a model: set synth.openai.base_url and "
                "synth.openai.model (or OPENAI_BASE_URL and KAT_AGENT_MODEL)"
            )
        key = config.api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=config.timeout_s, max_retries=2)
        self.temperature = config.temperature

    def _chat(self, system: str, user: str) -> str:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                temperature=self.temperature,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            )
        except openai.APIConnectionError as e:
            raise KatError(f"agent endpoint {self.client.base_url} unreachable: {e}") from None
        except openai.APIStatusError as e:
            raise KatError(f"agent endpoint {self.client.base_url} answered {e.status_code}: {e.message}") from None
        return reply.choices[0].message.content or ""

    def draft(self, task: Task, item: Item, rng: random.Random) -> Draft:
        text = self._chat(_SOLVER, item.prompt)
        m = re.search(r"answer\s*:\s*(.+)\s*$", text.strip(), flags=re.IGNORECASE)
        answer = m[1].strip() if m else ""
        body = text[: m.start()] if m else text
        return Draft([ln.strip() for ln in body.splitlines() if ln.strip()], answer)

    def think(self, task: Task, item: Item, draft: Draft) -> str:
        text = self._chat(_THINKER, f"Problem: {item.prompt}\nSolution:\n" + "\n".join(draft.steps))
        return "\n".join(ln.strip() for ln in text.splitlines() if ln.strip())

    def critique_steps(self, task: Task, item: Item, think: str) -> bool:
        # a model writes steps in its own words, so the task's step checker (which reads our trace
        # notation) does not apply here; the model critic judges the steps, the verifier the answer
        verdict = self._chat(_CRITIC, f"Problem: {item.prompt}\nReasoning:\n{think}")
        return verdict.strip().upper().startswith("VALID")


def make_agents(backend: str, *, error_rate: float, openai: OpenAIAgentConfig) -> Agents:
    if backend == "programmatic":
        return ProgrammaticAgents(error_rate)
    if backend == "openai":
        return OpenAIAgents(openai)
    raise KatError(f"unknown agent backend {backend!r}; known: programmatic, openai")

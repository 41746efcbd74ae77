"""The task interface every family implements, and the registry `get_task` reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kat_core.errors import KatError


@dataclass
class Item:
    """One task instance. `answer` is the gold answer (for code tasks: the reference solution)."""

    id: str
    family: str
    prompt: str
    answer: str
    difficulty: int
    steps: list[str] = field(default_factory=list)  # reference step-by-step trace, when the family has one
    meta: dict[str, Any] = field(default_factory=dict)  # family-specific (tests, entry point, operands…)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Task(ABC):
    name: str = ""
    splits: tuple[str, ...] = ("test",)

    @abstractmethod
    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Item]:
        """Items of a split; with `n`, a seeded sample of n of them (deterministic for a seed)."""

    @abstractmethod
    def verify(self, item: Item, answer_text: str) -> bool:
        """Whether `answer_text` (the content of <answer>) is a correct answer to `item`."""

    def answer_text(self, item: Item) -> str:
        """How a response states the gold answer inside <answer> (the verifier must accept it)."""
        return item.answer

    def intent_features(self, item: Item) -> dict[str, Any]:
        """Features of the request a judge can reason from (family, steps, operand sizes)."""
        return {"family": self.name, "difficulty": item.difficulty, "steps": len(item.steps)}

    def item_of(self, record: dict[str, Any]) -> Item | None:
        """The item a dataset record was made from, rebuilt from what the record says (its `source_id`
        here: the item of that id in one of the splits), so that validation can re-verify the record's
        answers with the task's own verifier; None if the record names no such item. The item must come
        from the task, not from the record: a record's own `answer` is what is being checked."""
        source_id = record.get("source_id")
        if not isinstance(source_id, str):
            return None
        if getattr(self, "_items_by_id", None) is None:
            self._items_by_id = {item.id: item for split in self.splits for item in self.examples(split)}
        return self._items_by_id.get(source_id)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise KatError(f"task {self.name!r} has no split {split!r}; it has: {', '.join(self.splits)}")


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        _REGISTRY[name] = factory
        return factory

    return deco


def known_tasks() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def task_splits(name: str) -> tuple[str, ...] | None:
    """The splits of the task family `name` (None: no such family), without loading its data."""
    _load_families()
    factory = _REGISTRY.get(name)
    return None if factory is None else tuple(getattr(factory, "splits", ("test",)))


def get_task(name: str, **options: Any) -> Task:
    """The task family `name`; options (e.g. `benchmarks_dir`) go to its constructor."""
    _load_families()
    if name not in _REGISTRY:
        raise KatError(f"unknown task family {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def _load_families() -> None:
    # importing the family modules registers them; kept lazy so `import kat_core.tasks` stays cheap
    from kat_core.tasks import arith, code, mathbench, retention  # noqa: F401

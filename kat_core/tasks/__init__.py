"""Task families: synthetic arithmetic, math benchmarks, code benchmarks — one interface (`Task`)."""

from kat_core.tasks.base import Item, Task, get_task, known_tasks

__all__ = ["Item", "Task", "get_task", "known_tasks"]

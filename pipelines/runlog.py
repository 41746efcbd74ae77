"""A run's two logs: `pipeline.log` for a person, `pipeline.debug.log` with everything kfp.local printed.

kfp.local prints each task's output, with its executor's input JSON (hundreds of lines a task), ANSI colour
codes and progress bars redrawn with carriage returns. `RunLog` is the stream the run's stdout goes to: it
writes every byte to the debug log, and to the human log each line with its colours removed, only the last
state of a progress bar, no executor JSON or bookkeeping lines, and the executor's prefix
(`[KFP Executor <date> <time>,<ms> INFO]: `) cut to the time. A training step line (`step 50/300 loss 1.39
...`, the engine's) is handed to `on_step`."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
EXECUTOR = re.compile(r"^(\s*)\[KFP Executor \d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),\d+ (\w+)\]: ")
STEP = re.compile(r"\bstep (\d+)/(\d+) loss (-?[\d.]+(?:e-?\d+)?|nan)")
# the executor's JSON blocks: its input ("Got executor_input:") and the outputs it returns
JSON_START = re.compile(r"(Got executor_input:|executor_output:|Executor output:)\s*$")
# the executor's own bookkeeping, one line each per task
PLUMBING = re.compile(r"^\s*\d\d:\d\d:\d\d "
                      r"(Looking for component `|Loading KFP component |Wrote executor output file to )")

# a tqdm bar (`label:  50%|#####     | 5/10 [00:01<00:01, 4.2it/s]`): kfp.local's line reader turns each
# carriage-return redraw into a line of its own, so a bar is held back until it stops redrawing
BAR = re.compile(r"^(.*?)\s*\d+%\|.*\|\s*[\d.]+[kMG]?/[\d.]+[kMG]?\b")

StepHook = Callable[[int, int, float], None]  # (step, total, loss)


def clean_line(line: str) -> str:
    """One line as a person reads it: no ANSI codes, the last redraw of a `\\r` progress bar, the executor's
    prefix cut to its time (and level, when not INFO)."""
    line = ANSI.sub("", line)
    if "\r" in line:  # a bar redrawn in place: its last state, at the line's indent
        indent = line[: len(line) - len(line.lstrip(" "))]
        parts = [p for p in line.split("\r") if p.strip()]
        line = indent + parts[-1].lstrip(" ") if parts else ""
    m = EXECUTOR.match(line)
    if m:
        indent, clock, level = m.groups()
        line = f"{indent}{clock} {'' if level == 'INFO' else level + ' '}{line[m.end():]}"
    return line.rstrip()


class RunLog(io.TextIOBase):
    """A text stream: everything to `debug`, the readable part to `human` (see the module docstring)."""

    def __init__(self, human: TextIO, debug: TextIO, on_step: StepHook | None = None):
        self.human, self.debug, self.on_step = human, debug, on_step
        self._pending = ""
        self._json_indent: str | None = None  # inside an executor JSON block: the indent of its closing brace
        self._json_next = False  # the line after "Got executor_input:" opens a JSON block
        self._bar: tuple[str, str] | None = None  # a progress bar held back: (its label, its last line)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.debug.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.debug.flush()
        self.human.flush()

    def close_pending(self) -> None:
        """Write out a last line without its newline, and a bar held back."""
        if self._pending:
            self._line(self._pending)
            self._pending = ""
        self._release_bar()
        self.flush()

    def _release_bar(self) -> None:
        if self._bar is not None:
            self.human.write(self._bar[1] + "\n")
            self._bar = None

    def _line(self, raw: str) -> None:
        line = clean_line(raw)
        if self._json_indent is not None:  # inside an executor JSON block: skip to its closing brace
            if line == self._json_indent + "}":
                self._json_indent = None
            return
        if self._json_next:
            self._json_next = False
            stripped = line.lstrip()
            if stripped == "{":
                self._json_indent = line[: len(line) - len(stripped)]
                return
        if JSON_START.search(line):
            self._json_next = True
            return
        if PLUMBING.match(line):
            return
        bar = BAR.match(line)
        if bar:
            if self._bar is not None and self._bar[0] != bar.group(1):
                self._release_bar()  # another bar: the previous one is done
            self._bar = (bar.group(1), line)
            return
        if not line.strip() and self._bar is not None:
            return  # the blank a bar's redraw leaves behind
        self._release_bar()
        if self.on_step:
            m = STEP.search(line)
            if m:
                self.on_step(int(m.group(1)), int(m.group(2)), float(m.group(3)))
        self.human.write(line + "\n")

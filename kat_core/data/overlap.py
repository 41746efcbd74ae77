"""Whether a training prompt copies an evaluation prompt: the validate stage's `overlap.*` checks and its
duplicate checks compare prompts in one normalised form (`normalize_prompt`), and `EvalIndex` holds the
evaluation prompts for the three overlap checks (exact, word n-gram, near-duplicate).

Near-duplicates: a character n-gram (over the normalised prompt) that occurs in more than
`_COMMON_CHARGRAM_PROMPTS` evaluation prompts (1% of them in a smaller index, at least 5) is shared wording
("how many", a prompt template), not content, and counts on neither side; a prompt with fewer than
`_MIN_CHARGRAMS` informative n-grams left (arith's "Compute 61-6.") is left to the exact check, since for
such a prompt a changed number is a different question, not a copy. Measured false-positive rate: 0 on
freshly synthesized demo data (`kat data synth --profile demo`); leave-one-out over the 1319 GSM8K test
questions, the closest other question scores at most 0.44 except for four pairs of genuine near-duplicates
inside GSM8K (0.64-0.81); a GSM8K question with one number changed (>= 0.84) or every 8th word dropped
(>= 0.74) is caught, with n = 6 and threshold 0.6 (README, "Verification").

Overlap: the evaluation prompts are the test split (`Task.examples("test")`) of every suite in
`overlap_suites`. The n-gram check compares hashed word n-grams (words = `\\w+` runs of the normalised text)
against a set built from those prompts; prompts shorter than n words are left to the exact check. An n-gram
that occurs in more than `_COMMON_NGRAM_PROMPTS` evaluation prompts is a template ("Solve the following
problem and put the answer in…"), not content, and is ignored, so a shared prompt template is not flagged.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from kat_core.config import TasksConfig
from kat_core.errors import KatError

_COMMON_NGRAM_PROMPTS = 5  # an n-gram in more evaluation prompts than this is template text
_COMMON_CHARGRAM_PROMPTS = 20  # a character n-gram in more evaluation prompts than this is shared wording
_MIN_CHARGRAMS = 30  # fewer informative character n-grams than this: too short to call a near-duplicate

_WORD_RE = re.compile(r"\w+")
_SPACE_RE = re.compile(r"\s+")


def normalize_prompt(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the form duplicates and overlaps are compared in."""
    return _SPACE_RE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(normalize_prompt(text))


def _char_grams(text: str, n: int) -> set[int]:
    # hashed like the word n-grams (salted per process, never leaves it)
    norm = normalize_prompt(text)
    return {hash(norm[i : i + n]) for i in range(len(norm) - n + 1)}


def _ngram_hashes(words: list[str], n: int) -> set[int]:
    # Python's str hash is salted per process, which is fine: the set never leaves this process
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def load_eval_prompts(suites: list[str], tasks_config: TasksConfig | None) -> dict[str, list[tuple[str, str]]]:
    """(item id, prompt) of the test split of each suite."""
    from kat_core.tasks import get_task

    options = {"benchmarks_dir": tasks_config.benchmarks_dir} if tasks_config and tasks_config.benchmarks_dir else {}
    out = {}
    for suite in suites:
        try:
            items = get_task(suite, **options).examples("test")
        except KatError as e:
            raise KatError(f"validate: cannot load evaluation suite {suite!r} for the overlap check: {e}") from None
        out[suite] = [(item.id, item.prompt) for item in items]
    return out


@dataclass
class EvalIndex:
    """Normalised evaluation prompts and their hashed n-grams, each pointing at one `suite/item id`."""

    n: int
    char_n: int = 5
    near_threshold: float = 0.5
    exact: dict[str, str] = field(default_factory=dict)
    ngrams: dict[int, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    common_ngrams: int = 0
    # near-duplicates: character n-gram -> evaluation prompts (by position in `refs`), informative n-grams
    # per evaluation prompt, and the n-grams too common to count
    postings: dict[int, list[int]] = field(default_factory=dict)
    refs: list[str] = field(default_factory=list)
    informative: list[int] = field(default_factory=list)
    common_chargrams: set[int] = field(default_factory=set)

    @classmethod
    def build(cls, prompts: dict[str, list[tuple[str, str]]], n: int, char_n: int = 5,
              near_threshold: float = 0.5) -> EvalIndex:
        index = cls(n=n, char_n=char_n, near_threshold=near_threshold)
        seen_in: Counter[int] = Counter()
        grams_of: list[set[int]] = []
        for suite, items in prompts.items():
            index.sizes[suite] = len(items)
            for item_id, prompt in items:
                ref = f"{suite}/{item_id}"
                index.exact.setdefault(normalize_prompt(prompt), ref)
                for h in _ngram_hashes(_words(prompt), n):
                    seen_in[h] += 1
                    index.ngrams.setdefault(h, ref)
                grams = _char_grams(prompt, char_n)
                for g in grams:
                    index.postings.setdefault(g, []).append(len(index.refs))
                index.refs.append(ref)
                grams_of.append(grams)
        for h, count in seen_in.items():
            if count > _COMMON_NGRAM_PROMPTS:
                del index.ngrams[h]
                index.common_ngrams += 1
        # a small index (a single short suite) cannot show 20 repeats of its template: 1% of it, at least 5
        common = max(_COMMON_NGRAM_PROMPTS, min(_COMMON_CHARGRAM_PROMPTS, len(index.refs) // 100))
        index.common_chargrams = {g for g, where in index.postings.items() if len(where) > common}
        for g in index.common_chargrams:
            del index.postings[g]
        index.informative = [len(grams - index.common_chargrams) for grams in grams_of]
        return index

    def near_match(self, prompt: str) -> str | None:
        """The evaluation prompt this one is a near-duplicate of (see the module docstring), or None."""
        grams = _char_grams(prompt, self.char_n) - self.common_chargrams
        if len(grams) < _MIN_CHARGRAMS:
            return None
        shared: Counter[int] = Counter()
        for g in grams:
            for k in self.postings.get(g, ()):
                shared[k] += 1
        for k, count in shared.most_common(5):
            smaller = min(len(grams), self.informative[k])
            if smaller >= _MIN_CHARGRAMS and count / smaller >= self.near_threshold:
                return self.refs[k]
        return None

    def exact_match(self, prompt: str) -> str | None:
        return self.exact.get(normalize_prompt(prompt))

    def ngram_match(self, prompt: str) -> str | None:
        words = _words(prompt)
        if len(words) < self.n:
            return None
        for i in range(len(words) - self.n + 1):
            ref = self.ngrams.get(hash(" ".join(words[i : i + self.n])))
            if ref is not None:
                return ref
        return None

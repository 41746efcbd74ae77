"""The verdict guard: an auto-mode decision is one of the grammar's two words, never a third token.

A judge reads `<description>: think` or `<description>: direct` (`kat_core.data.judge`), and the word after
the colon is the decision. A small model whose description sits between two feature cells of opposite verdicts
can put its mass on neither: measured on pipeline seed 1's two-round cold start after "difference, 3 steps,
carries, 1-digit result:", ',' 0.32, ' think' 0.30, ' direct' 0.21 (README, "Labels for the model that
decides"). The response is then malformed and scored wrong, a decision lost to a token the grammar does not
allow. So while a row's judge is open, the token after a colon is drawn from the two verdict words only
(the model's own distribution over them, renormalised); nothing else is constrained. Forced modes pre-fill the
whole judge and never meet the guard. Log-probs stay those of the raw distribution (`kat_core.rollout`).

Plain and speculative decoding both apply it (greedy speculative output stays token-for-token the plain one).
A tokenizer without the grammar's tags, or that does not spell ':' and the two words as one token each, gets
no guard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kat_core.format import JUDGE_CLOSE, JUDGE_OPEN


@dataclass(frozen=True)
class VerdictGuard:
    colon: int
    verdicts: tuple[int, int]  # ' think', ' direct'
    judge_open: int
    judge_close: int

    @classmethod
    def of(cls, tokenizer) -> VerdictGuard | None:
        """The guard for this tokenizer's spelling of the judge, or None where it has none."""
        tags = [tokenizer.convert_tokens_to_ids(t) for t in (JUDGE_OPEN, JUDGE_CLOSE)]
        if any(t is None or t == tokenizer.unk_token_id for t in tags):
            return None
        # the judge's last two tokens, as the cold start's SFT and the forced prefixes spell them
        spelled = [tokenizer(f"{JUDGE_OPEN}sum, 2 steps: {word}{JUDGE_CLOSE}", add_special_tokens=False)["input_ids"]
                   for word in ("think", "direct")]
        if any(ids[-1] != tags[1] or len(ids) < 4 for ids in spelled) or spelled[0][-3] != spelled[1][-3]:
            return None
        colon, think, direct = spelled[0][-3], spelled[0][-2], spelled[1][-2]
        if tokenizer.decode([colon]).strip() != ":" or len({colon, think, direct}) < 3:
            return None
        return cls(colon, (think, direct), *tags)

    def start(self, contexts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (last token, judge open) per row of these contexts (prompt and forced prefix)."""
        last = [ctx[-1] if ctx else -1 for ctx in contexts]
        opened = [self.advance_one(False, ctx) for ctx in contexts]
        return torch.tensor(last, dtype=torch.long, device=device), torch.tensor(opened, device=device)

    def advance_one(self, opened: bool, tokens: list[int]) -> bool:
        for t in tokens:
            opened = True if t == self.judge_open else False if t == self.judge_close else opened
        return opened

    def verdict_index(self, tokens: list[int], opened: bool = False) -> int | None:
        """Where in `tokens` (generated after a context whose judge is `opened`) the first verdict was drawn: the
        token after a colon of an open judge; None when there is none."""
        for k in range(1, len(tokens)):
            opened = self.advance_one(opened, [tokens[k - 1]])
            if opened and tokens[k - 1] == self.colon:
                return k
        return None

    def advance(self, opened: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Judge open after `tok` (one token per row)."""
        return (opened | (tok == self.judge_open)) & (tok != self.judge_close)

    def mask(self, logits: torch.Tensor, last: torch.Tensor, opened: torch.Tensor) -> torch.Tensor:
        """`logits` (rows, [positions,] V) with only the verdict words left where the token before is a colon of
        an open judge (`last`, `opened`: per row, or per row and position)."""
        at = (last == self.colon) & opened
        if not bool(at.any()):
            return logits
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[list(self.verdicts)] = True
        return logits.masked_fill(at[..., None] & ~allowed, float("-inf"))

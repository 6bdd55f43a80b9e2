"""A replay draft: proposes the target's own recorded greedy continuation, corrupted at a chosen rate.

It costs nothing to run, and its acceptance rate is set by `error_rate` (each proposed token is replaced by a
different random token with that probability). So a benchmark can measure the engine's overhead at any
acceptance rate, on any target, even a random-weight one of real size.
"""

from __future__ import annotations

import random

import torch

from specvlm.specdec.drafts import Draft
from specvlm.specdec.proposal import Proposal


class ReplayDraft(Draft):
    name = "replay"

    def __init__(
        self, scripts: list[list[int]], *, error_rate: float, vocab_size: int, device: torch.device, seed: int = 0
    ):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        self.scripts = scripts  # per request, in the order the batch will hold them
        self.error_rate = error_rate
        self.vocab_size = vocab_size
        self.device = device
        self.seed = seed

    def prefill(self, requests, max_new_tokens, gamma):
        if len(requests) != len(self.scripts):
            raise ValueError("a replay draft needs one recorded continuation per request")
        self.rows = list(range(len(requests)))  # script index per row
        self.position = [0] * len(requests)  # tokens committed per row
        # One stream per script, so corruption does not depend on how requests are batched.
        self.rngs = [random.Random(self.seed * 1_000_003 + i) for i in range(len(requests))]

    def _corrupt(self, token: int, rng: random.Random) -> int:
        if rng.random() >= self.error_rate:
            return token
        return (token + rng.randrange(1, self.vocab_size)) % self.vocab_size

    def propose(self, n, gamma, params, rng):
        tokens = torch.zeros(n, gamma, dtype=torch.long)
        lengths = []
        for row in range(n):
            script, rng = self.scripts[self.rows[row]], self.rngs[self.rows[row]]
            upcoming = [self._corrupt(t, rng) for t in script[self.position[row] : self.position[row] + gamma]]
            tokens[row, : len(upcoming)] = torch.tensor(upcoming, dtype=torch.long)
            lengths.append(len(upcoming))
        return Proposal.chain(tokens.to(self.device), torch.tensor(lengths, device=self.device), None, draft_calls=0)

    def commit(self, tokens, counts):
        for row, count in enumerate(counts.tolist()):
            self.position[row] += count

    def move_rows(self, dst, src):
        for d, s in zip(dst, src):
            self.rows[d], self.position[d] = self.rows[s], self.position[s]

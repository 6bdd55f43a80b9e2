"""A replay draft: proposes the target's own recorded greedy continuation, corrupted at a chosen rate.

It costs nothing to run, and its acceptance rate is set by `error_rate` (each proposed token is replaced by a
different random token with that probability). So a benchmark can measure the engine's overhead at any
acceptance rate, on any target, even a random-weight one of real size.

With `siblings` > 1 it proposes a tree instead: at every depth the recorded token plus siblings - 1 random
tokens that are leaves, so the verifier, the tree masks and the commit's compaction run at real size too.
"""

from __future__ import annotations

import hashlib
import random

import torch

from specvlm.specdec.drafts import Draft, to_device
from specvlm.specdec.proposal import Proposal
from specvlm.specdec.requests import Request


def _image_of(request: Request) -> str | None:
    """What tells apart requests whose prompt ids are equal: a caption prompt's ids hold only image placeholders,
    so every image of a caption benchmark has the same ids, and only the pixels say which continuation is its."""
    if request.image_key is not None:
        return request.image_key
    if request.pixel_values is None:
        return None
    return hashlib.sha1(request.pixel_values.detach().cpu().numpy().tobytes()).hexdigest()


def record_scripts(requests: list[Request], continuations: list[list[int]]) -> dict[tuple, list[int]]:
    """(image, prompt ids) -> the target's greedy continuation: the scripts a ReplayDraft replays."""
    return {(_image_of(r), tuple(r.input_ids)): tokens for r, tokens in zip(requests, continuations)}


class ReplayDraft(Draft):
    name = "replay"

    def __init__(
        self,
        scripts: dict[tuple[int, ...], list[int]],
        *,
        error_rate: float,
        target_vocab: int,
        device: torch.device,
        gamma: int = 5,
        seed: int = 0,
        siblings: int = 1,
    ):
        """scripts: from record_scripts, (image, prompt ids) -> the target's greedy continuation."""
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        self.scripts = scripts
        self.prompt_lengths = sorted({len(p) for _, p in scripts})
        self.error_rate = error_rate
        self.target_vocab = target_vocab  # the target's logit width: corrupted tokens are drawn below it
        self.device = device
        self.max_depth = gamma
        self.seed = seed
        self.siblings = siblings
        self.rows: list[tuple[list[int], int, random.Random] | None] = []  # script, position, corruption stream

    def reset(self):
        self.rows = []

    def allocate(self, rows, capacity):
        self.rows = (self.rows + [None] * rows)[:rows]

    def admit(self, rows, requests):
        errors = {}
        for i, (row, request) in enumerate(zip(rows, requests)):
            ids, image = tuple(request.input_ids), _image_of(request)
            # A request may arrive with tokens generated so far: its prompt is the recorded prefix.
            prompt = next((ids[:n] for n in self.prompt_lengths if (image, ids[:n]) in self.scripts), None)
            if prompt is None:
                errors[i] = "replay draft: no recorded continuation for this prompt"
                continue
            # One corruption stream per prompt, so corruption does not depend on batching.
            stream = random.Random(hash((self.seed, image, prompt)))
            self.rows[row] = (self.scripts[image, prompt], len(ids) - len(prompt), stream)
        return errors

    def release(self, rows):
        for row in rows:
            self.rows[row] = None

    def _corrupt(self, token: int, stream: random.Random) -> int:
        if stream.random() >= self.error_rate:
            return token
        return (token + stream.randrange(1, self.target_vocab)) % self.target_vocab

    def max_nodes(self, depth):
        return depth * self.siblings

    def propose(self, n, depth, params, rng):
        tokens = torch.zeros(n, depth, dtype=torch.long)
        lengths = []
        for row in range(n):
            upcoming = []
            if self.rows[row] is not None:
                script, position, stream = self.rows[row]
                upcoming = [self._corrupt(t, stream) for t in script[position : position + depth]]
            tokens[row, : len(upcoming)] = torch.tensor(upcoming, dtype=torch.long)
            lengths.append(len(upcoming))
        lengths = torch.tensor(lengths)
        if self.siblings == 1:
            return Proposal.chain(to_device(tokens, self.device), to_device(lengths, self.device), None, draft_calls=0)
        return self._tree(tokens, lengths)

    def _tree(self, line: torch.Tensor, depths: torch.Tensor) -> Proposal:
        """Level j holds nodes j*k .. j*k+k-1: the recorded token first (it carries the tree on), then leaves."""
        n, depth = line.shape
        k = self.siblings
        index = torch.arange(depth * k)
        level = index // k
        tokens = (line[:, level] + index % k) % self.target_vocab  # siblings differ from the line's token
        parents = torch.where(level > 0, (level - 1) * k, -1).expand(n, -1)
        # A node sees the line's nodes above it, and itself.
        on_line = index % k == 0
        ancestry = (on_line[None, :] & (level[None, :] < level[:, None])) | torch.eye(depth * k, dtype=torch.bool)
        return Proposal(
            to_device(tokens, self.device),
            to_device(parents.contiguous(), self.device),
            to_device(depths * k, self.device),
            None,
            0,
            to_device(ancestry.expand(n, -1, -1).contiguous(), self.device),
            levels=depth,
            children=k,
        )

    def calls(self, depth):
        return 0

    def commit(self, step):
        for row, count in enumerate(step.host_counts.tolist()):
            if self.rows[row] is not None:
                script, position, stream = self.rows[row]
                self.rows[row] = (script, position + count, stream)

    def move_rows(self, dst, src):
        for d, s in zip(dst, src):
            self.rows[d] = self.rows[s]

"""Image prefixes kept across admissions: a request about an image that a recent request showed starts from that
request's cached prefix, without the vision tower and without prefilling the prefix again.

Continuous batching admits requests as rows free up, a few at a time, so the questions about one image seldom
join in one admission, and grouping within an admission (prefix.py) alone shares little: in the demo VQA job
with 5 questions per image, most admissions took one or two rows. The cache keeps the keys and values of the
last few prefilled image prefixes, each under its group key (prefix.py: the image's content and the tokens up to
the end of the image). A later request with the same key copies the entry's first slots, as many as its cached
prompt has in common with the entry's tokens (always every image token), and prefills only the rest.

The copy is exact for the reason prefix.py gives: a prefix's keys and values depend on its tokens, its image
features and their positions alone. An entry is a slice of a prefill the engine ran anyway (a group's prefix, or
a whole prompt, whose first slots are its prefix's), so keeping one costs a copy, never a forward pass.

Entries are whole rows of their own cache, outside the running batch, within a slot budget the decoder takes
from its own (decode.py); the least recently used entry goes first.
"""

from __future__ import annotations

import collections

import torch

from specvlm.specdec.prefix import common_length
from specvlm.specdec.runner import ModelRunner

MAX_ENTRIES = 8  # prefixes kept: adjacent questions about one image join within a few admissions of each other
SLOT_STEP = 64  # an entry row's slots grow in these steps, so that a slightly longer prefix rarely reallocates


class PrefixCache:
    """Prefilled prefixes of one model (target or draft) under their group keys, at most `max_slots` slots."""

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.runner: ModelRunner | None = None  # row r holds entry r's keys and values
        self.entries: collections.OrderedDict[tuple, tuple[int, tuple[int, ...]]] = collections.OrderedDict()
        self.hits = 0  # requests that started from an entry, for reports and tests

    def find(self, key: tuple, cached: list[int]) -> tuple[int, int] | None:
        """(entry row, slots to copy) for a request with group key `key` whose model reads `cached` before its
        first decoding step, or None when no entry holds its key."""
        found = self.entries.get(key)
        if found is None:
            return None
        self.entries.move_to_end(key)
        row, tokens = found
        return row, common_length([cached, tokens])

    def store(self, key: tuple, tokens: list[int], source: ModelRunner, source_row: int) -> None:
        """Keep source's row `source_row`, whose first len(tokens) slots hold `tokens`, as the entry for `key`."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if self.runner is None or len(tokens) > self.runner.capacity:
            capacity = -(-len(tokens) // SLOT_STEP) * SLOT_STEP
            rows = min(MAX_ENTRIES, self.max_slots // capacity)
            if rows == 0:
                return  # a prefix this long does not fit the budget: requests prefill it themselves
            if self.runner is None:
                self.runner = source.scratch(rows, capacity)
            else:  # longer rows: fewer may fit, and the entries in rows that go are dropped
                self.runner.resize(rows, capacity)
                self.entries = collections.OrderedDict((k, e) for k, e in self.entries.items() if e[0] < rows)
        free = sorted(set(range(self.runner.rows)) - {row for row, _ in self.entries.values()})
        row = free[0] if free else self.entries.popitem(last=False)[1][0]
        index = torch.tensor([row], dtype=torch.long, device=source.device)
        source_index = torch.tensor([source_row], dtype=torch.long, device=source.device)
        self.runner.cache.take_rows(index, source.cache, len(tokens), source_index)
        self.runner.set_lengths([row], len(tokens), len(tokens))
        self.entries[key] = (row, tuple(tokens))

    def clear(self) -> None:
        self.runner, self.entries = None, collections.OrderedDict()

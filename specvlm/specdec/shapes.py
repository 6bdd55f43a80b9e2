"""The shapes a decode forward runs at: exact, or rounded up to a small known set (buckets).

A CUDA graph replays one recorded shape, so a job that captures its steps must meet few shapes: rows, the
verification window and the attention read length are each rounded up to a bucket, and the padding is
computed and thrown away. Every padded query (a column past a row's tokens, or a row past the batch) sees
committed slot 0 only, carries position 0, and writes its key and value to a trash slot that no read covers,
so padding changes nothing a real token computes.

Where nothing is captured (eager, and torch.compile on a CPU, whose inductor kernels take any size) shapes stay
exact: on a device bound by arithmetic every padded token is paid for.
"""

from __future__ import annotations

from dataclasses import dataclass


def _pow2_and_half(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them) that is >= n."""
    size = 1
    while size < n:
        half = size + size // 2
        if size >= 2 and half >= n:
            return half
        size *= 2
    return size


@dataclass(frozen=True)
class ShapeBuckets:
    static: bool = False  # False: every shape exact
    read_step: int = 128  # static read lengths are multiples of this, and then of powers of two above 8 steps

    def rows(self, n: int, limit: int) -> int:
        """Rows a forward over n rows runs at (never more than the rows allocated)."""
        return min(_pow2_and_half(n), limit) if self.static else n

    def window(self, q: int) -> int:
        """Query tokens per row: 1 (plain decoding), 2, 3, 5, 9, 17, ... (one token plus a power of two)."""
        if not self.static or q <= 2:
            return q
        width = 2
        while width + 1 < q:
            width *= 2
        return width + 1

    def read_len(self, need: int, capacity: int) -> int:
        """Slots attention reads, for a batch whose longest row needs `need`; at most `capacity`."""
        if not self.static:
            return need
        steps = -(-need // self.read_step)
        return min(_pow2_and_half(steps) * self.read_step if steps > 8 else steps * self.read_step, capacity)


EXACT = ShapeBuckets(static=False)
STATIC = ShapeBuckets(static=True)

"""How many rows to decode together, found by measurement (batch size "auto").

Throughput jobs want the running batch as large as pays: more rows share each weight read, until the device
turns compute-bound and tokens/s stops rising. Where that happens depends on the model, the hardware and the
prompts, so the cap is calibrated on the first requests: start small, and double the cap while doubling raises
tokens/s by at least GAIN, within the memory budget. Each cap is measured over WINDOW steps at full occupancy
(every row busy and requests waiting), with the admission of new rows (their prefill) counted in. Its first
WARMUP saturated steps are not counted: they fill the new rows at once, and they are where the speculation
controller learns the costs of a row count it has not seen (controller.py); counted in, they would price every
larger cap below what it decodes at once settled. It starts at START rows (or what the budget allows): small
batches are rarely what a throughput job wants, and every window spent below the best cap costs throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field

START, LIMIT = 64, 1024
WINDOW = 32  # steps per measurement: about one output's length, so that rows finish and join within it
WARMUP = 4  # saturated steps at a new cap before its measurement starts
GAIN = 1.03


@dataclass
class AutoRows:
    cap: int = START
    limit: int = LIMIT  # rows the memory budget allows
    settled: bool = False
    rates: dict[int, float] = field(default_factory=dict)  # cap -> tokens/s measured
    _tokens: int = 0
    _seconds: float = 0.0
    _steps: int = 0
    _warmup: int = WARMUP

    def observe(self, rows: int, waiting: bool, tokens: int, seconds: float) -> None:
        """After a step (admission included) over `rows` rows that committed `tokens` in `seconds`."""
        self.cap = min(self.cap, self.limit)
        if self.settled:
            return
        if rows < self.cap or not waiting:
            return  # not saturated: the cap is not what limits this step
        if self._warmup > 0:
            self._warmup -= 1
            return
        self._tokens += tokens
        self._seconds += seconds
        self._steps += 1
        if self._steps < WINDOW:
            return
        self.rates[self.cap] = self._tokens / self._seconds
        self._tokens, self._seconds, self._steps, self._warmup = 0, 0.0, 0, WARMUP
        best = max(self.rates, key=self.rates.get)
        if (
            best == self.cap
            and self.cap * 2 <= self.limit
            and self.rates[best] > GAIN * self.rates.get(self.cap // 2, 0)
        ):
            self.cap *= 2
        else:
            self.cap, self.settled = best, True

    def describe(self) -> dict:
        return {"rows": self.cap, "settled": self.settled, "tokens_per_s_by_rows": dict(sorted(self.rates.items()))}

"""The speculative decoding loop, with continuous batching: requests join the running batch as rows finish.

Rows hold requests; rows [0, n) are the running batch. Per-row state (tensors indexed by row):
    tokens[row]        committed ids: the prompt, then generated tokens
    length[row]        committed token count
    generated[row]     generated token count
    limit[row]         tokens the row may generate: its max_new_tokens, or fewer where the model's positions end
    drafted[row]       the draft holds this row (rows the draft does not hold decode one token per step)
    target.kv_len[row] committed tokens whose keys/values are cached: always length - 1, because the last
                       committed token (the target's own last pick) is fed at the start of the next step.

One step, for every row at once:
    0. admit:   waiting requests take the rows that finished (prefill: image features checked per request, the
                prompt cached in one pass), or the batch is compacted when nobody waits          (prefill.py)
    1. draft:   the draft proposes a chain or tree of tokens below the last committed one, as deep as the
                controller decides this step pays (0: plain decoding)               (drafts.py, tree.py, controller.py)
    2. verify:  the target scores [last, node 0, ..., node k-1] in one forward pass, each node seeing its
                ancestors only (a tree mask; causal for a chain)                            (runner.py)
    3. accept:  the verifier picks the accepted path d_1..d_a and one target token t      (verify.py)
    4. commit:  append d_1..d_a, t; move the path's cache entries next to the prefix (a no-op for a chain);
                advance kv_len by a + 1; tell the draft; stop rows on EOS or at their limit.
    5. retire:  finished rows hand back their results and free their rows.
Rejected drafts leave stale cache slots beyond kv_len that the next step overwrites: rollback is free. A row's
output does not depend on which rows share its batch or when it joined: greedy output is the target's argmax at
every position, and a sampled row draws its randomness from its own seed, the same count every step.

A step reads the device once. Steps 1-4 are queued on the device without the host waiting for any of them; then
one small tensor comes back (per row: the committed tokens, their count, the proposal's size), and everything
the host decides (which rows finished, each row's metrics and output, the next step's depth and shapes, the
draft's bookkeeping) is decided from that and from host copies of the lengths, kept in step with the device's.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from specvlm.specdec.autobatch import AutoRows, free_memory, kv_bytes_per_slot, slot_budget
from specvlm.specdec.compiled import StepCompiler, cuda_graphs
from specvlm.specdec.controller import DepthController
from specvlm.specdec.drafts import Commit, Draft, ModelDraft, append_tokens
from specvlm.specdec.metrics import SampleMetrics
from specvlm.specdec.prefill import image_token_id, prefill
from specvlm.specdec.prefix_cache import PrefixCache
from specvlm.specdec.proposal import Proposal
from specvlm.specdec.requests import Request, Result, TargetSpec, validate
from specvlm.specdec.rotary import RequestRotary, refuse_recomputing_generate
from specvlm.specdec.runner import ModelRunner, causal_attend
from specvlm.specdec.sampling import RowRandom, SamplingParams
from specvlm.specdec.shapes import EXACT, STATIC, ShapeBuckets
from specvlm.specdec.timing import StepTimer, host_clock
from specvlm.specdec.verify import Verdict, verify_greedy, verify_sampling

WARM_UP_SLOTS = 64  # cache slots per scratch row of the warm-up (warm_up)
CAPACITY_STEP = 64  # cache slots per row grow in these steps, so that a slightly longer prompt rarely reallocates
PREFIX_CACHE_SHARE = 16  # the prefixes kept across admissions may hold 1/16 of the cache slot budget


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 64  # per request, unless the request sets its own
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] | None = None  # None: the target's generation config
    max_rows: int | None = 8  # rows decoded together (None: found by measurement, autobatch.py)
    max_batch_tokens: int | None = None  # cache slots of all rows together (prompt + output + draft window)
    adaptive: bool = True  # greedy: choose each step's draft depth from measured costs (see controller.py)
    compile: bool = False  # torch.compile the target's and the draft's decode forwards (compiled.py)
    # Round shapes up to buckets (shapes.py); None: exactly when compiled forwards replay CUDA graphs.
    static_shapes: bool | None = None
    # The target's final norm and LM head in float32 at every verified position, so that a window pass and a
    # one-token pass decide bf16 near-ties alike (runner.py DecodeForward).
    float32_head: bool = False
    # Requests showing the same image behind the same leading tokens prefill them once, in the target and the
    # draft (prefix.py); off, every request prefills its whole prompt.
    share_prefill: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None (auto), got {self.max_rows}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")


def generation_eos(model: torch.nn.Module) -> tuple[int, ...]:
    """The end-of-sequence ids of the model's generation config (what `generate` stops on)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


@dataclass
class Live:
    """A request holding a row."""

    id: int
    request: Request
    prompt_len: int
    position_limited: bool  # its limit is where the model's positions end, not its max_new_tokens
    metrics: SampleMetrics
    start: float
    draft_refused: bool = False  # the draft could not take this request: it decodes without one
    output: list[int] = field(default_factory=list)  # generated so far, on the host


@dataclass
class DecodeState:
    """The rows of the running batch (see the module docstring). Rows [0, n) are decoded; a row whose request
    finished is a hole until a waiting request takes it or the batch is compacted, both before the next step.
    Lengths live on the device and, in step with them, on the host (`host`: length, generated, limit)."""

    tokens: torch.Tensor  # [rows, capacity]
    length: torch.Tensor  # [rows]
    generated: torch.Tensor  # [rows]
    limit: torch.Tensor  # [rows]
    drafted: np.ndarray  # [rows] bool, host only: the draft holds the row
    host: dict[str, np.ndarray]  # "length", "generated", "limit": [rows] each
    target: ModelRunner
    rng: RowRandom | None
    live: list[Live | None]
    n: int = 0

    @property
    def rows(self) -> int:
        return len(self.live)

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def left(self, n: int) -> np.ndarray:
        """Tokens each of rows [0, n) may still generate."""
        return self.host["limit"][:n] - self.host["generated"][:n]


@dataclass
class _Host:
    """What a step's one read of the device brings back, for rows [0, n)."""

    tokens: np.ndarray  # [n, k+1] the new tokens: d_1..d_a, t, then scratch
    counts: np.ndarray  # [n] how many of them the row committed
    nodes: np.ndarray  # [n] draft tokens it verified
    row_depth: np.ndarray  # [n] depth of its deepest proposed node
    draft_calls: int  # draft passes the step made
    read_at: float = field(default_factory=host_clock)  # on the clock that prices steps (timing.py)


class SpeculativeDecoder:
    """submit() requests, then step() until they are done (or generate() for a list at once). Requests wait in
    a queue and join the running batch as rows free up; step() returns the results of rows that finished."""

    def __init__(self, target: torch.nn.Module, draft: Draft | None, config: DecodeConfig = DecodeConfig()):
        self.target = target
        self.draft = draft
        self.config = config
        self.spec = TargetSpec.from_model(target)
        self.device = target.device
        eos = config.eos_token_ids if config.eos_token_ids is not None else generation_eos(target)
        self.eos = torch.tensor(list(eos) or [-1], device=self.device)
        self.eos_host = frozenset(eos)
        self.max_depth = draft.max_depth if draft is not None else 0
        # A target whose rotary frequencies depend on a prompt's whole length (longrope) computes a shared prefix
        # differently for each prompt length: its rows prefill alone.
        self.share_prefill = config.share_prefill and RequestRotary.of(target) is None
        self.compiler = StepCompiler(self.device) if config.compile else None
        static = config.static_shapes
        if static is None:
            static = config.compile and cuda_graphs(self.device)
        self.shapes: ShapeBuckets = STATIC if static else EXACT
        self.window = 1 + (draft.max_nodes(self.max_depth) if draft is not None else 0)  # verified tokens per row
        self.auto_rows = AutoRows() if config.max_rows is None else None
        # Each slot is held by the target and, as large again, by a model draft (autobatch.py).
        self.slot_bytes = kv_bytes_per_slot(target)
        if isinstance(draft, ModelDraft):
            self.slot_bytes += kv_bytes_per_slot(draft.model)
        self.max_batch_tokens = slot_budget(config.max_batch_tokens, self.slot_bytes, free_memory(self.device))
        # Prefixes kept across admissions (prefix_cache.py), the target's and the draft's, hold their slots out of
        # the running batch's budget.
        prefix_slots = self.max_batch_tokens // PREFIX_CACHE_SHARE if self.share_prefill else 0
        self.max_batch_tokens -= prefix_slots
        self.prefix_cache = PrefixCache(prefix_slots) if self.share_prefill else None
        self.controller = None
        if draft is not None:
            draft.reset()
            draft.use(self.shapes, self.compiler, PrefixCache(prefix_slots) if self.share_prefill else None)
            self.controller = DepthController(self.max_depth, draft.max_nodes, draft.calls, 1, config.adaptive)
        self.timer = StepTimer(self.device)
        self.waiting: collections.deque[tuple[int, Request, int]] = collections.deque()  # (id, request, limit)
        self.ready: list[tuple[int, Result]] = []  # results not handed out yet
        self.state: DecodeState | None = None
        self.next_id = 0
        self.last_step_tokens = 0
        # Where the time goes: admitting requests (prefill) against decoding steps, for reports and benchmarks.
        self.seconds = {"admission": 0.0, "decoding": 0.0}
        # Refuse now a target whose attention or rotary the runner cannot reproduce, or whose window a tree would
        # outgrow. A chain's tokens sit in the slots of their positions, so its masks are exact under any window; a
        # tree's nodes sit past their positions, which a window no longer than the tree could tell apart (runner.py).
        windows = [w for w in ModelRunner(target, 1, 1).windows.values() if w is not None]
        refuse_recomputing_generate(target)
        tree = self.window - 1 > self.max_depth
        if tree and windows and min(windows) <= self.window:
            raise ValueError(
                f"the target's sliding window of {min(windows)} tokens is not longer than a tree's verification "
                f"window of {self.window}; use a smaller tree (draft.tree.max_nodes, draft.gamma) or draft.mode=chain"
            )
        if self.compiler is not None:
            self.warm_up()

    # ---- the public interface -------------------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. A request that fails validation is answered at the next step."""
        rid, self.next_id = self.next_id, self.next_id + 1
        error = validate(request, self.spec)
        if error:
            self.ready.append((rid, Result.failed(error)))
        else:
            wanted = request.max_new_tokens or self.config.max_new_tokens
            self.waiting.append((rid, request, wanted))
        return rid

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.ready or (self.state is not None and self.state.n))

    # Inference mode throughout, admission included: every buffer the forwards take is then an inference tensor,
    # so compiled forwards meet one kind of tensor (a mix is a guard failure and a recompile).
    @torch.inference_mode()
    def step(self) -> list[tuple[int, Result]]:
        """Admit waiting requests, run one decoding step, and return (id, result) for every request finished."""
        started = time.perf_counter()
        self._admit()
        admitted = time.perf_counter()
        self.seconds["admission"] += admitted - started
        finished, self.ready = self.ready, []
        state = self.state
        if state is None or state.n == 0:
            return finished
        rows, waiting = state.n, bool(self.waiting)
        finished += self._step(state)
        ended = time.perf_counter()  # the step's read of the device has waited for all of it
        self.seconds["decoding"] += ended - admitted
        if self.auto_rows is not None:
            self.auto_rows.observe(rows, waiting, self.last_step_tokens, ended - started)
        return finished

    def generate(self, requests: list[Request]) -> list[Result]:
        """One Result per request, in order. A request that fails validation gets an error Result and does not
        disturb the others."""
        ids = [self.submit(r) for r in requests]
        wanted, results = set(ids), {}
        while wanted - results.keys():
            for rid, result in self.step():
                results[rid] = result
        return [results[i] for i in ids]

    def describe(self) -> dict:
        """The running batch's shape and the controller's cost model, for reports and manifests."""
        state = self.state
        shape = {"rows": state.rows, "capacity": state.capacity} if state is not None else {}
        return {
            **shape,
            "seconds": dict(self.seconds),
            "auto_rows": self.auto_rows.describe() if self.auto_rows else None,
            "kv": {"bytes_per_slot": self.slot_bytes, "slot_budget": self.max_batch_tokens},
            "controller": self.controller.describe() if self.controller else None,
            "compile": self.compiler.describe() if self.compiler else None,
            "static_shapes": self.shapes.static,
        }

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the forwards the steps run before the first request comes (compute.compile): the target's
        one-token pass, its verification pass and its prompt passes (of one row and of several), and the draft's,
        on scratch rows. Their shapes are dynamic, or bucketed on a GPU, so later steps meet these graphs; the time
        shows in describe()["compile"]. Graphs stay on the models, so a decoder built again later (after a failure)
        finds them compiled."""
        model = getattr(self.draft, "model", None)
        runs = [(self.target, None, "target", sorted({1, self.window}), True, self.config.float32_head)]
        if model is not None:
            images = not getattr(self.draft, "text_only", True)
            runs.append((model, getattr(self.draft, "lean", None), "draft", [1, 2], images, False))
        for model, lean, role, widths, images, float32_head in runs:
            runner = ModelRunner(
                model,
                2,
                WARM_UP_SLOTS,
                lean,
                shapes=self.shapes,
                compiler=self.compiler,
                role=role,
                float32_head=float32_head,
            )
            device = runner.device
            tokens = torch.zeros(2, 4, dtype=torch.long, device=device)
            runner.prefill(tokens, [4, 3])  # eager: it allocates the cache
            # Admission's prompt pass: over embeddings where the model reads images (prefill.py), else tokens.
            embeds = model.get_input_embeddings()(tokens) if images and image_token_id(model) is not None else None
            runner.extend(tokens, [4, 3], inputs_embeds=embeds)
            # A one-row prompt (an admission of one request) is a graph of its own: a size of 1 is a constant.
            runner.extend(tokens[:1], [4], inputs_embeds=None if embeds is None else embeds[:1])
            for q in widths:
                tokens = torch.zeros(2, q, dtype=torch.long, device=device)
                runner.forward(tokens, causal_attend(torch.full((2,), q, device=device), q))

    # ---- one step ---------------------------------------------------------------------------------------------

    def _step(self, state: DecodeState) -> list[tuple[int, Result]]:
        n = state.n
        timer = self.timer
        timer.mark()
        depth = self._depth(state)
        proposal = self._draft(state, depth)
        timer.mark()
        logits = self._verify(state, proposal)
        timer.mark()
        verdict = self._accept(state, proposal, logits)
        step = self._commit(state, proposal, verdict)
        timer.mark()
        host = self._read_back(state, proposal, step)
        finished = self._retire(state, host)
        if self.controller is not None:
            draft_s, verify_s, queued_s = timer.phases()
            rest_s = queued_s + host_clock() - host.read_at
            self.controller.observe(
                n, depth, host.row_depth, host.counts - 1, (draft_s, verify_s, rest_s), proposal.draft_calls
            )
        return finished

    def _depth(self, state: DecodeState) -> int:
        if self.controller is None:
            return 0
        n = state.n
        return self.controller.choose(n, state.drafted[:n], state.left(n), self.config.sampling.greedy)

    def _draft(self, state: DecodeState, depth: int) -> Proposal:
        n = state.n
        if depth == 0:
            proposal = Proposal.empty(n, self.device)
        else:
            proposal = self.draft.propose(n, depth, self.config.sampling, state.rng)
        # A row never proposes deeper than it may still generate, counting the target's own token.
        proposal.limit_depth(state.limit[:n] - state.generated[:n] - 1)
        return proposal

    def _verify(self, state: DecodeState, proposal: Proposal) -> torch.Tensor:
        """One target pass over [last committed token, node 0, ..., node k-1] -> logits [n, k+1, V]."""
        n = state.n
        last = state.tokens[:n].gather(1, (state.length[:n] - 1)[:, None])
        depth = torch.cat([torch.zeros_like(last), proposal.depth()], 1)
        return state.target.forward(torch.cat([last, proposal.tokens], 1), proposal.verification_attend(), depth=depth)

    def _accept(self, state: DecodeState, proposal: Proposal, logits: torch.Tensor) -> Verdict:
        if state.rng is None:
            return verify_greedy(logits, proposal)
        # A fixed count per row and step, so a request's randomness never depends on its batch.
        uniforms = state.rng.uniforms(state.n, self.window)
        k = proposal.tokens.shape[1]
        chosen = torch.cat([uniforms[:, :k], uniforms[:, -1:]], 1)
        return verify_sampling(logits, proposal, self.config.sampling, chosen)

    def _commit(self, state: DecodeState, proposal: Proposal, verdict: Verdict) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the accepted path and the target's token, on the device. Returns the new tokens [n, k+1]
        (d_1..d_a, t, scratch) and how many of them each row committed [n] (fewer where an EOS came first)."""
        n, k = proposal.tokens.shape
        accepted = verdict.accepted
        path = verdict.path.clamp(min=0)
        new = torch.cat([proposal.tokens.gather(1, path), torch.zeros_like(accepted)[:, None]], 1)
        new.scatter_(1, accepted[:, None], verdict.next_token[:, None])  # [n, k+1]: d_1..d_a, t, scratch
        counts = accepted + 1
        is_eos = torch.isin(new, self.eos) & (torch.arange(k + 1, device=self.device)[None, :] < counts[:, None])
        counts = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, counts)

        if not proposal.is_chain:
            # Window slot 0 holds the last token, slot 1 + i node i: bring the path's entries to slots 1..a.
            state.target.compact_window(n, torch.cat([torch.zeros_like(accepted)[:, None], 1 + path], 1))
        state.target.kv_len[:n] += counts  # the last token and the accepted drafts are now committed
        append_tokens(state.tokens, state.length, new, counts)
        state.generated[:n] += counts
        return new, counts

    def _read_back(self, state: DecodeState, proposal: Proposal, step: tuple[torch.Tensor, torch.Tensor]) -> _Host:
        """The step's one read of the device; brings the host's copies of the lengths up to date and tells the
        draft what was committed."""
        new, counts = step
        n, width = new.shape
        packed = torch.cat([new, counts[:, None], proposal.lengths[:, None], proposal.row_depth()[:, None]], 1)
        host = packed.cpu().numpy()
        read = _Host(host[:, :width], host[:, width], host[:, width + 1], host[:, width + 2], proposal.draft_calls)
        state.target.kv_host[:n] += read.counts
        for name in ("length", "generated"):
            state.host[name][:n] += read.counts
        if self.draft is not None:
            self.draft.commit(Commit(new, counts, read.tokens, read.counts))
        self.last_step_tokens = int(read.counts.sum())
        return read

    def _retire(self, state: DecodeState, host: _Host) -> list[tuple[int, Result]]:
        """Account the step to each row; hand back the results of finished rows, whose rows become holes."""
        n = state.n
        now = time.perf_counter()
        done = state.host["generated"][:n] >= state.host["limit"][:n]
        finished, rows = [], []
        for row in range(n):
            live = state.live[row]
            count = int(host.counts[row])
            committed = host.tokens[row, :count].tolist()
            live.output += committed
            m = live.metrics
            m.new_tokens += count
            m.target_calls += 1
            m.draft_calls += host.draft_calls if host.nodes[row] else 0
            m.proposed_tokens += int(host.nodes[row])
            m.accepted_tokens += count - 1
            m.accepted_per_step.append(count - 1)
            m.nodes_per_step.append(int(host.nodes[row]))
            hit_eos = committed[-1] in self.eos_host
            if hit_eos or done[row]:
                m.latency_s = now - live.start
                reason = "eos" if hit_eos else "max_positions" if live.position_limited else "max_tokens"
                finished.append((live.id, Result(live.output, reason, metrics=m)))
                state.live[row] = None
                rows.append(row)
        self._release(state, rows)
        return finished

    def _release(self, state: DecodeState, rows: list[int]) -> None:
        if not rows:
            return
        state.target.release(rows)
        if self.draft is not None:
            self.draft.release(rows)
            state.drafted[rows] = False

    # ---- admission --------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Waiting requests take free rows (holes first); then the batch is made dense again."""
        if self.waiting:
            state = self.state
            free = [] if state is None else [row for row in range(state.n) if state.live[row] is None]
            chosen = self._take_waiting(len(free))
            if chosen:
                self._start(chosen, free)
        if self.state is not None:
            self._compact(self.state)
            self._catch_up(self.state)

    def _need(self, request: Request, limit: int) -> int:
        """Cache slots a request needs per row: prompt, output, and one verification window."""
        return len(request.input_ids) + limit + self.window

    def _take_waiting(self, holes: int) -> list[tuple[int, Request, int, bool]]:
        """Requests that fit now, in order: rows free, and (with a token budget) their cache slots. A request
        that does not fit yet stops the queue, so it cannot be overtaken forever."""
        state = self.state
        live = 0 if state is None else sum(x is not None for x in state.live[: state.n])
        capacity = 0 if state is None else state.capacity
        chosen = []
        while self.waiting:
            rid, request, wanted = self.waiting[0]
            positions_left = self.spec.max_positions - len(request.input_ids)
            limit = min(wanted, positions_left)
            need = max(capacity, _round_up(self._need(request, limit)))
            rows = self._rows_for(need)
            if live + len(chosen) + 1 > rows:
                break
            self.waiting.popleft()
            chosen.append((rid, request, limit, positions_left < wanted))
            capacity = need
        return chosen

    def _rows_for(self, capacity: int) -> int:
        """Rows of `capacity` slots that may run together: the cap, within the token budget."""
        fit = max(1, self.max_batch_tokens // capacity)
        if self.auto_rows is not None:
            self.auto_rows.limit = fit
            cap = self.auto_rows.cap
        else:
            cap = self.config.max_rows
        return min(cap, fit)

    def _start(self, chosen: list[tuple[int, Request, int, bool]], holes: list[int]) -> None:
        capacity = max(_round_up(self._need(r, limit)) for _, r, limit, _ in chosen)
        if self.state is not None and capacity > self.state.capacity:
            self._compact(self.state)  # the rows may be reallocated: no holes may be left among them
            holes = []
        state = self._reserve(capacity)
        rows = (holes + list(range(state.n, state.rows)))[: len(chosen)]
        requests = [r for _, r, _, _ in chosen]
        scratch, good, errors = prefill(
            self.target,
            requests,
            [r.input_ids for r in requests],
            max(len(r.input_ids) for r in requests),
            share=self.share_prefill,
            like=state.target,
            cache=self.prefix_cache,
        )
        for i, message in errors.items():
            self.ready.append((chosen[i][0], Result.failed(message)))
        if not good:
            return
        now = time.perf_counter()
        taken = [rows[i] for i in good]
        state.target.take_rows(taken, scratch)
        cost = self.draft.cost_ratio if self.draft is not None else 0.0
        lengths, limits = [], []
        for i in good:
            rid, request, limit, position_limited = chosen[i]
            row, prompt = rows[i], request.input_ids
            state.tokens[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
            state.live[row] = Live(rid, request, len(prompt), position_limited, SampleMetrics(cost_ratio=cost), now)
            lengths.append(len(prompt))
            limits.append(limit)
            if state.rng is not None:
                state.rng.seed_row(row, request.seed)
        index = torch.tensor(taken, device=self.device)
        for name, values in (("length", lengths), ("generated", [0] * len(taken)), ("limit", limits)):
            getattr(state, name)[index] = torch.tensor(values, device=self.device)
            state.host[name][taken] = values
        state.n = max(state.n, max(taken) + 1)
        if self.controller is not None:
            self.controller.reset_rows(taken)
            if self.controller.wants_drafting or not self.config.sampling.greedy:
                self._draft_rows(state, taken, [requests[i] for i in good])

    def _draft_rows(self, state: DecodeState, rows: list[int], requests: list[Request]) -> None:
        """The draft starts holding these rows; a row it cannot serve decodes without it."""
        errors = self.draft.admit(rows, requests)
        for i, row in enumerate(rows):
            if i in errors:
                state.live[row].draft_refused = True
            else:
                state.drafted[row] = True

    def _catch_up(self, state: DecodeState) -> None:
        """When drafting pays again, the draft takes over rows that joined while it did not (prompt and tokens so
        far), if they have enough left to generate to repay the draft's prefill."""
        if self.controller is None or not self.controller.wants_drafting or not self.config.sampling.greedy:
            return
        n = state.n
        left = state.left(n)
        rows = [
            row
            for row in range(n)
            if not state.drafted[row] and not state.live[row].draft_refused and left[row] > 2 * self.max_depth
        ]
        if rows:
            requests = []
            for row in rows:
                live = state.live[row]
                request = live.request
                so_far = list(request.input_ids) + live.output
                requests.append(Request(so_far, request.pixel_values, request.image_sizes, request.seed))
            self._draft_rows(state, rows, requests)

    def _reserve(self, capacity: int) -> DecodeState:
        """The state, with room for rows of `capacity` slots (allocated or grown as needed)."""
        state = self.state
        capacity = max(capacity, state.capacity) if state is not None else capacity
        rows = self._rows_for(capacity)
        if state is not None and capacity == state.capacity and rows <= state.rows:
            return state
        if state is None:
            greedy = self.config.sampling.greedy
            self.state = state = DecodeState(
                tokens=torch.zeros(rows, capacity, dtype=torch.long, device=self.device),
                length=torch.zeros(rows, dtype=torch.long, device=self.device),
                generated=torch.zeros(rows, dtype=torch.long, device=self.device),
                limit=torch.zeros(rows, dtype=torch.long, device=self.device),
                drafted=np.zeros(rows, dtype=bool),
                host={name: np.zeros(rows, dtype=np.int64) for name in ("length", "generated", "limit")},
                target=ModelRunner(
                    self.target,
                    rows,
                    capacity,
                    shapes=self.shapes,
                    compiler=self.compiler,
                    float32_head=self.config.float32_head,
                ),
                rng=None if greedy else RowRandom([0] * rows, self.device),
                live=[None] * rows,
            )
        else:
            # Fewer rows may fit at a larger capacity (_take_waiting admitted only what fits), or the cap grew.
            kept = min(rows, state.rows)
            tokens = torch.zeros(rows, capacity, dtype=torch.long, device=self.device)
            tokens[:kept, : state.capacity] = state.tokens[:kept]
            state.tokens = tokens
            for name in ("length", "generated", "limit"):
                old = getattr(state, name)
                new = old.new_zeros(rows)
                new[:kept] = old[:kept]
                setattr(state, name, new)
                state.host[name] = _resized(state.host[name], rows)
            state.drafted = _resized(state.drafted, rows)
            state.target.resize(rows, capacity)
            state.live = (state.live + [None] * rows)[:rows]
            if state.rng is not None:
                state.rng.resize(rows)
        if self.draft is not None:
            self.draft.allocate(rows, capacity)
            self.controller.resize(rows)
        return state

    def _compact(self, state: DecodeState) -> None:
        """Move rows from the tail into holes, so that rows [0, n) are all live (few rows move)."""
        while state.n > 0 and state.live[state.n - 1] is None:
            state.n -= 1
        holes = [row for row in range(state.n) if state.live[row] is None]
        if not holes:
            return
        tail = [row for row in range(state.n - 1, -1, -1) if state.live[row] is not None][: len(holes)]
        pairs = [(d, s) for d, s in zip(holes, tail) if d < s]
        dst, src = [d for d, _ in pairs], [s for _, s in pairs]
        dst_t, src_t = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
        for tensor in (state.tokens, state.length, state.generated, state.limit):
            tensor[dst_t] = tensor[src_t]
        for array in (*state.host.values(), state.drafted):
            array[dst] = array[src]
        state.target.move_rows(dst, src)
        if self.draft is not None:
            self.draft.move_rows(dst, src)
            self.controller.move_rows(dst, src)
        self._release(state, src)  # the moved rows' old places hold nothing now, for the draft neither
        if state.rng is not None:
            state.rng.move_rows(dst, src)
        for d, s in pairs:
            state.live[d], state.live[s] = state.live[s], None
        state.n -= len(holes)


def _round_up(slots: int) -> int:
    return -(-slots // CAPACITY_STEP) * CAPACITY_STEP


def _resized(array: np.ndarray, rows: int) -> np.ndarray:
    new = np.zeros(rows, dtype=array.dtype)
    new[: min(rows, len(array))] = array[:rows]
    return new

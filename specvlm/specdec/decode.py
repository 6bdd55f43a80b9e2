"""The speculative decoding loop: prefill, then per step draft -> verify -> accept -> commit, for a ragged batch.

State per row (tensors indexed by row; rows [0, n) are active, finished rows are compacted away):
    tokens[row]        committed ids: the prompt, then generated tokens
    length[row]        committed token count
    generated[row]     generated token count
    target.kv_len[row] committed tokens whose keys/values are cached: always length - 1, because the last
                       committed token (the target's own last pick) is fed at the start of the next step.

One step, for every active row at once:
    1. draft:   the draft proposes a chain or tree of tokens below the last committed one  (drafts.py, tree.py)
    2. verify:  the target scores [last, node 0, ..., node k-1] in one forward pass, each node seeing its
                ancestors only (a tree mask; causal for a chain)                            (runner.py)
    3. accept:  the verifier picks the accepted path d_1..d_a and one target token t      (verify.py)
    4. commit:  append d_1..d_a, t; move the path's cache entries next to the prefix (a no-op for a chain);
                advance kv_len by a + 1; tell the draft; stop rows on EOS or max_new_tokens.
Rejected drafts leave stale cache slots beyond kv_len that the next step overwrites: rollback is free.
Autoregressive decoding is the same loop with an empty proposal (draft=None), so baselines share the code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specvlm.specdec.drafts import Draft, append_tokens
from specvlm.specdec.metrics import SampleMetrics
from specvlm.specdec.proposal import Proposal
from specvlm.specdec.requests import Request, Result, TargetSpec, collate_images, validate
from specvlm.specdec.runner import ModelRunner
from specvlm.specdec.sampling import RowRandom, SamplingParams
from specvlm.specdec.verify import Verdict, verify_greedy, verify_sampling


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 64
    gamma: int = 5  # draft depth per step: chain length, or tree depth (ignored without a draft)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")


@dataclass
class DecodeState:
    """The ragged state of the requests being decoded together (see the module docstring)."""

    tokens: torch.Tensor
    length: torch.Tensor
    generated: torch.Tensor
    prompt_lens: list[int]
    target: ModelRunner
    rng: RowRandom | None
    row_ids: list[int]  # which request each row holds
    metrics: list[SampleMetrics]
    results: list[Result | None]
    start: float

    @property
    def n(self) -> int:
        return len(self.row_ids)


class SpeculativeDecoder:
    def __init__(self, target: torch.nn.Module, draft: Draft | None, config: DecodeConfig):
        self.target = target
        self.draft = draft
        self.config = config
        self.spec = TargetSpec.from_model(target)
        self.device = target.device
        self.max_nodes = draft.max_nodes(config.gamma) if draft is not None else 0
        self.eos = torch.tensor(config.eos_token_ids or [-1], device=self.device)

    def generate(self, requests: list[Request]) -> list[Result]:
        """One Result per request, in order. A request that fails validation gets an error Result and does
        not disturb the others."""
        results: list[Result | None] = [None] * len(requests)
        good = []
        for i, request in enumerate(requests):
            error = validate(request, self.spec, self.config.max_new_tokens)
            if error:
                results[i] = Result.failed(error)
            else:
                good.append(i)
        if good:
            for i, result in zip(good, self._decode([requests[i] for i in good])):
                results[i] = result
        return results

    @torch.inference_mode()
    def _decode(self, requests: list[Request]) -> list[Result]:
        batch = self._prefill(requests)
        while batch.n > 0:
            proposal = self._draft(batch)
            logits = self._verify(batch, proposal)
            verdict = self._accept(batch, proposal, logits)
            done, hit_eos = self._commit(batch, proposal, verdict)
            if bool(done.any()):
                self._retire(batch, done, hit_eos)
        return batch.results

    def _prefill(self, requests: list[Request]) -> DecodeState:
        cfg, device = self.config, self.device
        prompt_lens = [len(r.input_ids) for r in requests]
        # Room for the prompt, every generated token, and one verification window of scratch.
        width = max(prompt_lens) + cfg.max_new_tokens + self.max_nodes + 1
        tokens = torch.zeros(len(requests), width, dtype=torch.long, device=device)
        for row, r in enumerate(requests):
            tokens[row, : len(r.input_ids)] = torch.tensor(r.input_ids)
        length = torch.tensor(prompt_lens, device=device)

        target = ModelRunner(self.target, len(requests), width)
        # All but the last prompt token: the first step feeds that one, like every later last token.
        target.prefill(tokens[:, : max(prompt_lens) - 1], length - 1, **collate_images(requests, self.target))
        if self.draft is not None:
            self.draft.prefill(requests, cfg.max_new_tokens, cfg.gamma)
        cost = self.draft.cost_ratio if self.draft is not None else 0.0
        return DecodeState(
            tokens=tokens,
            length=length,
            generated=torch.zeros_like(length),
            prompt_lens=prompt_lens,
            target=target,
            rng=None if cfg.sampling.greedy else RowRandom([r.seed for r in requests], device),
            row_ids=list(range(len(requests))),
            metrics=[SampleMetrics(cost_ratio=cost) for _ in requests],
            results=[None] * len(requests),
            start=time.perf_counter(),
        )

    def _draft(self, batch: DecodeState) -> Proposal:
        n = batch.n
        if self.draft is None:
            proposal = Proposal.empty(n, self.device)
        else:
            proposal = self.draft.propose(n, self.config.gamma, self.config.sampling, batch.rng)
        # A row never proposes deeper than it may still generate, counting the target's own token.
        proposal.limit_depth(self.config.max_new_tokens - batch.generated[:n] - 1)
        return proposal

    def _verify(self, batch: DecodeState, proposal: Proposal) -> torch.Tensor:
        """One target pass over [last committed token, node 0, ..., node k-1] -> logits [n, k+1, V]."""
        n = batch.n
        last = batch.tokens[:n].gather(1, (batch.length[:n] - 1)[:, None])
        depth = torch.cat([torch.zeros_like(last), proposal.depth()], 1)
        return batch.target.forward(torch.cat([last, proposal.tokens], 1), proposal.verification_attend(), depth=depth)

    def _accept(self, batch: DecodeState, proposal: Proposal, logits: torch.Tensor) -> Verdict:
        if batch.rng is None:
            return verify_greedy(logits, proposal)
        # A fixed count per row and step, so a request's randomness never depends on its batch.
        uniforms = batch.rng.uniforms(batch.n, self.max_nodes + 1)
        k = proposal.tokens.shape[1]
        return verify_sampling(
            logits, proposal, self.config.sampling, torch.cat([uniforms[:, :k], uniforms[:, -1:]], 1)
        )

    def _commit(self, batch: DecodeState, proposal: Proposal, verdict: Verdict) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the accepted path and the target's token; returns (finished rows [n], stopped on EOS [n])."""
        n, k = proposal.tokens.shape
        device = self.device
        accepted = verdict.accepted
        new = torch.cat([proposal.tokens.gather(1, verdict.path.clamp(min=0)), torch.zeros_like(accepted)[:, None]], 1)
        new.scatter_(1, accepted[:, None], verdict.next_token[:, None])  # [n, k+1]: d_1..d_a, t, scratch
        counts = accepted + 1
        is_eos = torch.isin(new, self.eos) & (torch.arange(k + 1, device=device)[None, :] < counts[:, None])
        hit_eos = is_eos.any(1)
        counts = torch.where(hit_eos, is_eos.long().argmax(1) + 1, counts)

        if not proposal.is_chain:
            # Window slot 0 holds the last token, slot 1 + i node i: bring the path's entries to slots 1..a.
            batch.target.compact_window(
                n, torch.cat([torch.zeros_like(accepted)[:, None], 1 + verdict.path.clamp(min=0)], 1)
            )
        batch.target.kv_len[:n] += counts  # the last token and the accepted drafts are now committed
        append_tokens(batch.tokens, batch.length, new, counts)
        batch.generated[:n] += counts
        if self.draft is not None:
            self.draft.commit(new, counts)
        self._account(batch, proposal, accepted.clamp(max=counts - 1), counts)
        return hit_eos | (batch.generated[:n] >= self.config.max_new_tokens), hit_eos

    def _retire(self, batch: DecodeState, done: torch.Tensor, hit_eos: torch.Tensor) -> None:
        """Record finished rows, then fill their places with survivors from the tail (few rows move)."""
        n, now = batch.n, time.perf_counter() - batch.start
        done_list, eos_list = done.tolist(), hit_eos.tolist()
        for row in (r for r in range(n) if done_list[r]):
            i = batch.row_ids[row]
            batch.metrics[i].latency_s = now
            out = batch.tokens[row, batch.prompt_lens[i] : batch.length[row]].tolist()
            batch.results[i] = Result(out, "eos" if eos_list[row] else "max_tokens", metrics=batch.metrics[i])
        keep = n - sum(done_list)
        dst = [r for r in range(keep) if done_list[r]]
        src = [r for r in range(keep, n) if not done_list[r]]
        if dst:
            dst_t, src_t = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
            for state in (batch.tokens, batch.length, batch.generated):
                state[dst_t] = state[src_t]
            batch.target.move_rows(dst_t, src_t)
            if self.draft is not None:
                self.draft.move_rows(dst, src)
            if batch.rng is not None:
                batch.rng.move_rows(dst, src)
            for d, s in zip(dst, src):
                batch.row_ids[d] = batch.row_ids[s]
        del batch.row_ids[keep:]

    @staticmethod
    def _account(batch: DecodeState, proposal: Proposal, accepted: torch.Tensor, counts: torch.Tensor) -> None:
        for row, (a, c, k) in enumerate(zip(accepted.tolist(), counts.tolist(), proposal.lengths.tolist())):
            m = batch.metrics[batch.row_ids[row]]
            m.new_tokens += c
            m.target_calls += 1
            m.draft_calls += proposal.draft_calls
            m.proposed_tokens += k
            m.accepted_tokens += a
            m.accepted_per_step.append(a)
            m.nodes_per_step.append(k)

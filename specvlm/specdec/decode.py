"""The speculative decoding loop: prefill, then per step draft -> verify -> accept -> commit, for a ragged batch.

State per row (all tensors indexed by row; rows [0, n) are active, finished rows are compacted away):
    tokens[row]        committed ids: the prompt, then generated tokens
    length[row]        committed token count
    generated[row]     generated token count
    target.kv_len[row] committed tokens whose keys/values are cached: always length - 1, because the last
                       committed token (the target's own last pick) is fed at the start of the next step.

One step, for every active row at once:
    1. the draft proposes up to gamma tokens d_1..d_k            (drafts.py)
    2. the target scores [last, d_1..d_k] in one forward pass    (runner.py)
    3. acceptance keeps a prefix d_1..d_a and adds one target token t   (verify.py)
    4. commit d_1..d_a, t: append them, advance kv_len by a + 1, tell the draft, stop rows on EOS/max tokens.
Rejected drafts leave stale cache slots beyond kv_len that the next step overwrites: rollback is free.
Autoregressive decoding is the same loop with an empty proposal (draft=None), so baselines share the code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specvlm.specdec.drafts import Draft, append_tokens, empty_proposal
from specvlm.specdec.metrics import SampleMetrics
from specvlm.specdec.requests import Request, Result, TargetSpec, collate_images, validate
from specvlm.specdec.runner import ModelRunner, causal_attend
from specvlm.specdec.sampling import RowRandom, SamplingParams
from specvlm.specdec.verify import verify_greedy, verify_sampling


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 64
    gamma: int = 5  # draft tokens per step (ignored without a draft)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")


class SpeculativeDecoder:
    def __init__(self, target: torch.nn.Module, draft: Draft | None, config: DecodeConfig):
        self.target = target
        self.draft = draft
        self.config = config
        self.spec = TargetSpec.from_model(target)
        self.device = target.device

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
        cfg, device = self.config, self.device
        start = time.perf_counter()
        n = len(requests)
        gamma = cfg.gamma if self.draft is not None else 0
        room = cfg.max_new_tokens + gamma + 1  # generated tokens plus one step of scratch
        prompt_lens = [len(r.input_ids) for r in requests]
        width = max(prompt_lens) + room

        tokens = torch.zeros(n, width, dtype=torch.long, device=device)
        for row, r in enumerate(requests):
            tokens[row, : len(r.input_ids)] = torch.tensor(r.input_ids)
        length = torch.tensor(prompt_lens, device=device)
        generated = torch.zeros(n, dtype=torch.long, device=device)
        eos = torch.tensor(cfg.eos_token_ids or [-1], device=device)

        target = ModelRunner(self.target, n, width)
        target.prefill(tokens[:, : max(prompt_lens) - 1], length - 1, **collate_images(requests, self.target))
        if self.draft is not None:
            self.draft.prefill(requests, room)
        rng = None if cfg.sampling.greedy else RowRandom([r.seed for r in requests], device)

        row_ids = list(range(n))  # which request each row holds
        metrics = [SampleMetrics(cost_ratio=self.draft.cost_ratio if self.draft else 0.0) for _ in requests]
        results: list[Result | None] = [None] * n

        while n > 0:
            uniforms = rng.uniforms(n, 2 * gamma + 1) if rng else None
            # 1. draft
            if self.draft is None:
                proposal = empty_proposal(n, device)
            else:
                proposal = self.draft.propose(n, gamma, cfg.sampling, uniforms[:, :gamma] if rng else None)
            # A row never proposes more than it may still generate, counting the target's own token.
            remaining = cfg.max_new_tokens - generated[:n]
            proposal.lengths = torch.minimum(proposal.lengths, remaining - 1)
            k = proposal.tokens.shape[1]

            # 2. verify: one target pass over [last committed token, d_1..d_k]
            last = tokens[:n].gather(1, (length[:n] - 1)[:, None])
            logits = target.forward(torch.cat([last, proposal.tokens], 1), causal_attend(proposal.lengths + 1, k + 1))

            # 3. accept
            if rng is None:
                accepted, next_token = verify_greedy(logits, proposal)
            else:
                accepted, next_token = verify_sampling(logits, proposal, cfg.sampling, uniforms[:, gamma:])

            # 4. commit d_1..d_a then t; cut at the first EOS
            new = torch.cat([proposal.tokens, torch.zeros_like(last)], 1)
            new.scatter_(1, accepted[:, None], next_token[:, None])
            counts = accepted + 1
            is_eos = torch.isin(new, eos) & (torch.arange(k + 1, device=device)[None, :] < counts[:, None])
            hit_eos = is_eos.any(1)
            counts = torch.where(hit_eos, is_eos.long().argmax(1) + 1, counts)
            append_tokens(tokens, length, new, counts)
            generated[:n] += counts
            target.kv_len[:n] += counts  # last + the accepted drafts now have committed cache entries
            if self.draft is not None:
                self.draft.commit(new, counts)

            done = hit_eos | (generated[:n] >= cfg.max_new_tokens)
            self._account(metrics, row_ids, proposal, accepted.clamp(max=counts - 1), counts)
            if not bool(done.any()):
                continue

            # Finished rows leave; survivors from the tail fill their places (few rows move, caches stay put).
            now = time.perf_counter() - start
            done_list, hit_list = done.tolist(), hit_eos.tolist()
            for row in [r for r in range(n) if done_list[r]]:
                i = row_ids[row]
                metrics[i].latency_s = now
                out = tokens[row, prompt_lens[i]: length[row]].tolist()
                results[i] = Result(out, "eos" if hit_list[row] else "max_tokens", metrics=metrics[i])
            keep = n - sum(done_list)
            dst = [r for r in range(keep) if done_list[r]]
            src = [r for r in range(keep, n) if not done_list[r]]
            if dst:
                dst_t, src_t = torch.tensor(dst, device=device), torch.tensor(src, device=device)
                for state in (tokens, length, generated):
                    state[dst_t] = state[src_t]
                target.move_rows(dst_t, src_t)
                if self.draft is not None:
                    self.draft.move_rows(dst, src)
                if rng is not None:
                    rng.move_rows(dst, src)
                for d, s in zip(dst, src):
                    row_ids[d] = row_ids[s]
            n = keep
            row_ids = row_ids[:n]
        return results

    @staticmethod
    def _account(metrics, row_ids, proposal, accepted, counts) -> None:
        for row, (a, c, k) in enumerate(zip(accepted.tolist(), counts.tolist(), proposal.lengths.tolist())):
            m = metrics[row_ids[row]]
            m.new_tokens += c
            m.target_calls += 1
            m.draft_calls += proposal.draft_calls
            m.proposed_tokens += k
            m.accepted_tokens += a
            m.accepted_per_step.append(a)

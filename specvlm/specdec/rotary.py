"""Rotary embeddings whose frequencies depend on a forward's longest position, computed per token as `generate`
computes them for one request.

Two of the rotary types transformers ships choose their frequencies from `max(position_ids) + 1` over the whole
forward: dynamic NTK rescales once that passes max_position_embeddings, and longrope switches from its short to
its long factors once it passes original_max_position_embeddings. `generate` for one request reads the prompt
in one forward and every later token alone, so its token at position p is computed with the frequencies of

    extent = the prompt's length   for a prompt token (the prompt forward's longest position + 1)
    extent = p + 1                 for every later token

A batched engine forward holds rows of other lengths, padding, and several tokens of one row, so its longest
position says nothing about any one token; `RequestRotary` replaces those rotary modules' choice by the
per-token one above while the engine's runner drives the model (`engaged`), and leaves the model's own
behaviour untouched outside it. The other types (default, linear, yarn, llama3) depend on the position alone.

Dynamic NTK never rescales in this engine: a request stops when it fills max_position_embeddings (stop reason
max_positions), so no extent passes it, and the runner clamps the positions of scratch tokens past a row's
limit. Its per-token frequencies are therefore the unscaled ones; computing them here rather than through the
module keeps one long row's scratch tokens from rescaling the others and keeps the forward free of the host
read the module's own check (`if seq_len > ...`) costs.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class UnsupportedRotary(ValueError):
    """The model's rotary scaling depends on its forward's extent in a way this engine does not reproduce."""


def _rope_type(module: torch.nn.Module) -> str:
    kind = module.rope_type
    if isinstance(kind, dict):  # one rotary per layer type (Gemma 3 style)
        scaled = sorted(t for t in kind.values() if _extent_dependent(t))
        if scaled:
            raise UnsupportedRotary(
                f"rope_type {scaled[0]!r} on a model with a rotary per layer type: its frequencies depend on each "
                "forward's longest position, which this engine reproduces only for one rotary per model"
            )
        return "default"
    return kind


def _extent_dependent(rope_type: str) -> bool:
    return "dynamic" in rope_type or rope_type == "longrope"


def _original_positions(config) -> int | None:
    """longrope's switching length: in rope_parameters since transformers 5, a config field before."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    found = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    return found or getattr(config, "original_max_position_embeddings", None)


class _TokenFrequencies:
    """One rotary module's forward with each token's frequencies chosen from its own extent."""

    def __init__(self, module: torch.nn.Module, rope_type: str, owner: RequestRotary):
        self.module = module
        self.original = module.forward
        self.owner = owner
        self.short = module.original_inv_freq  # [head_dim / 2]: the unscaled (dynamic) or short (longrope) set
        self.long = None
        self.threshold = 1 << 62  # extents above it take the long set (longrope only)
        if rope_type == "longrope":
            self.threshold = _original_positions(module.config) or module.config.max_position_embeddings
            # As transformers computes it: longrope's init gives the long factors for any length past the threshold.
            self.long, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, self.short.device, seq_len=self.threshold + 1)

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor):  # x [n, q, hidden]; position_ids [n, q]
        if not self.owner.active:
            return self.original(x, position_ids)
        prompt = self.owner.prompt_lengths
        extent = position_ids + 1 if prompt is None else prompt[:, None].expand_as(position_ids)  # [n, q]
        inv_freq = self.short.to(device=x.device, dtype=torch.float)
        if self.long is not None:
            long = self.long.to(device=x.device, dtype=torch.float)
            inv_freq = torch.where((extent > self.threshold)[..., None], long, inv_freq)  # [n, q, head_dim / 2]
        # The module's own arithmetic (an elementwise product, then cos and sin), so the result is bit-identical
        # to what it gives a forward whose extent is the token's.
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = self.module.attention_scaling
        return (emb.cos() * scaling).to(dtype=x.dtype), (emb.sin() * scaling).to(dtype=x.dtype)

    def matches_module(self) -> bool:
        """Whether the per-token forward gives the module's own output where one extent holds for a whole
        forward: below and above longrope's threshold, and (dynamic) up to max_position_embeddings."""
        limit = self.module.config.max_position_embeddings
        lengths = [limit - 1] if self.long is None else [self.threshold, self.threshold + 1]
        device = self.short.device
        x = torch.zeros(1, 1, 1, device=device)
        for length in lengths:
            positions = torch.arange(length, device=device)[None]
            expected = self.original(x, positions)
            with self.owner.engaged(torch.tensor([length], device=device)):
                found = self.__call__(x, positions)
            if not all(torch.equal(a, b) for a, b in zip(expected, found)):
                return False
        return True


class RequestRotary:
    """Per-token rotary frequencies for a model's extent-dependent rotary modules, while `engaged`."""

    def __init__(self, model: torch.nn.Module):
        self.active = False
        self.prompt_lengths: torch.Tensor | None = None
        self.modules: list[_TokenFrequencies] = []
        for module in model.modules():
            if not hasattr(module, "rope_type") or not hasattr(module, "original_inv_freq"):
                continue
            rope_type = _rope_type(module)
            if not _extent_dependent(rope_type):
                continue
            replaced = _TokenFrequencies(module, rope_type, self)
            if list(inspect.signature(replaced.original).parameters) != ["x", "position_ids"]:
                raise UnsupportedRotary(
                    f"rope_type {rope_type!r} on {type(module).__name__}, whose forward this engine does not know: "
                    "its frequencies depend on each forward's longest position, which this engine reproduces per "
                    "token only for the Llama-style rotary"
                )
            if not replaced.matches_module():
                raise UnsupportedRotary(
                    f"rope_type {rope_type!r} on {type(module).__name__}: per-token frequencies differ from the "
                    "module's own, so this engine cannot reproduce its output"
                )
            module.forward = replaced
            self.modules.append(replaced)

    @classmethod
    def of(cls, model: torch.nn.Module) -> RequestRotary | None:
        """The model's per-token rotary (one per model: every runner over it shares the one its modules already
        call, also in a deep copy, whose modules call the copy's); None where every rotary of the model depends
        on the position alone."""
        for module in model.modules():
            replaced = module.__dict__.get("forward")
            if isinstance(replaced, _TokenFrequencies):
                return replaced.owner
        rotary = cls(model)
        return rotary if rotary.modules else None

    @contextlib.contextmanager
    def engaged(self, prompt_lengths: torch.Tensor | None = None):
        """Forwards inside see per-token frequencies. prompt_lengths [n]: a prompt forward, each row's whole
        prompt length (its tokens all take it as their extent); None: a decoding forward (extent p + 1)."""
        self.active, self.prompt_lengths = True, prompt_lengths
        try:
            yield
        finally:
            self.active, self.prompt_lengths = False, None


def engaged(rotary: RequestRotary | None, prompt_lengths: torch.Tensor | None = None):
    """`rotary.engaged(...)`, or nothing to do for a model whose rotary depends on the position alone."""
    return contextlib.nullcontext() if rotary is None else rotary.engaged(prompt_lengths)


def refuse_recomputing_generate(target: torch.nn.Module) -> None:
    """Refuse a longrope target whose own `generate` recomputes the whole cache when a sequence passes
    original_max_position_embeddings (Phi-3 and its kin): every cached token then takes the long factors, which
    an engine that keeps its cache cannot reproduce without computing the row's prefix again."""
    text = target.config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "longrope":
        return
    original = _original_positions(text)
    if original is None or text.max_position_embeddings <= original:
        return
    if "original_max_position_embeddings" in inspect.getsource(type(target).prepare_inputs_for_generation):
        raise UnsupportedRotary(
            f"{type(target).__name__} target with rope_type 'longrope' and max_position_embeddings "
            f"{text.max_position_embeddings} > original_max_position_embeddings {original}: its generate computes "
            f"the whole sequence again with the long factors once it passes {original} tokens, which this engine "
            "does not reproduce; use a target whose rope_parameters are not longrope, or a Llama-family target"
        )

"""Prefill: new requests' prompts into a cache of their own, with each request's image features checked.

The vision tower runs once for all new requests together, through the model's own `get_image_features`. Each
request's features are counted against its image placeholders before any language-model pass: in a batched
forward the model only checks the batch's total, so a request short of features next to one with too many would
silently trade features with it, and any other mismatch fails the whole batch. The checked features are then put
in place of the placeholders, in order, exactly as the model's forward does, and the prompts run through the
language model in one pass. The caller copies the prefilled rows into its running batch (ModelRunner.take_rows).
"""

from __future__ import annotations

import inspect

import torch

from specvlm.specdec.lean_llama import LeanLlama
from specvlm.specdec.prefix import SharedPrefix, group_key, image_key, shared_prefixes
from specvlm.specdec.prefix_cache import PrefixCache
from specvlm.specdec.requests import Request
from specvlm.specdec.runner import ModelRunner

# Vision settings a model's get_image_features takes, read from its config (older transformers releases do not
# fill them in by themselves).
VISION_SETTINGS = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")


def image_token_id(model: torch.nn.Module) -> int | None:
    config = model.config
    token = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if token is None else token


def image_inputs(requests: list[Request], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's image kwargs (pixel_values, image_sizes) for the images of `requests`, in order; requests
    without an image contribute none."""
    with_image = [r for r in requests if r.pixel_values is not None]
    if not with_image:
        return {}
    pixels = [r.pixel_values for r in with_image]
    if pixels[0].dim() == 5:
        # LLaVA-NeXT style [images, crops, C, H, W]: the crop count varies per image; pad it like the processor
        # does, the model drops the padding using image_sizes.
        most = max(p.shape[1] for p in pixels)
        pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    inputs = {"pixel_values": torch.cat(pixels).to(device=model.device, dtype=model.dtype)}
    if with_image[0].image_sizes is not None:
        inputs["image_sizes"] = torch.cat([r.image_sizes for r in with_image]).to(model.device)
    return inputs


def _collate(requests: list[Request], model: torch.nn.Module) -> dict:
    """get_image_features' inputs for all images of `requests`, in order."""
    inputs = image_inputs(requests, model)
    parameters = inspect.signature(model.get_image_features).parameters
    if "image_sizes" in inputs and "batch_num_images" in parameters:
        inputs["batch_num_images"] = torch.tensor([len(r.pixel_values) for r in requests])
    for name in VISION_SETTINGS:
        if name in parameters and getattr(model.config, name, None) is not None:
            inputs[name] = getattr(model.config, name)
    return inputs


def _features_of(requests: list[Request], model: torch.nn.Module) -> list[torch.Tensor]:
    """Each request's image features [tokens, hidden], its images' features concatenated in order."""
    out = model.get_image_features(**_collate(requests, model))
    per_image = getattr(out, "pooler_output", out)
    if isinstance(per_image, torch.Tensor):  # [images, tokens, hidden] from fixed-size towers
        per_image = list(per_image) if per_image.dim() == 3 else [per_image]
    per_image = list(per_image)
    features, start = [], 0
    for r in requests:
        count = len(r.pixel_values)
        features.append(torch.cat(per_image[start : start + count]))
        start += count
    return features


def image_features(
    requests: list[Request], model: torch.nn.Module, share: bool = False
) -> list[torch.Tensor | str | None]:
    """Per request: its image features [tokens, hidden], None when it has no image, or an error message.
    share: the vision tower reads each distinct image once (prefix.py's image_key), its features serve them all."""
    result: list[torch.Tensor | str | None] = [None] * len(requests)
    with_image = [i for i, r in enumerate(requests) if r.pixel_values is not None]
    if not with_image:
        return result
    source = {i: i for i in with_image}  # request -> the request whose image the tower reads for it
    if share:
        first: dict[str, int] = {}
        source = {i: first.setdefault(image_key(requests[i]), i) for i in with_image}
    read = sorted(set(source.values()))
    try:
        features = _features_of([requests[i] for i in read], model)
    except Exception:  # one malformed image must not fail the others: retry one by one
        features = []
        for i in read:
            try:
                features += _features_of([requests[i]], model)
            except Exception as exc:
                features.append(
                    f"the vision tower cannot read this image ({type(exc).__name__}: {exc}); "
                    "preprocess it with the target's own processor"
                )
    by_source = dict(zip(read, features))
    token = image_token_id(model)
    for i in with_image:
        found = by_source[source[i]]
        placeholders = sum(1 for t in requests[i].input_ids if t == token)
        if isinstance(found, torch.Tensor) and len(found) != placeholders:
            found = (
                f"the prompt has {placeholders} image placeholder tokens, the model expects {len(found)} for this "
                "image; build the prompt with the target's own processor from the same image"
            )
        result[i] = found
    return result


def prefill(
    model: torch.nn.Module,
    requests: list[Request],
    prompts: list[list[int]],
    capacity: int,
    use_images: bool = True,
    lean: LeanLlama | None = None,
    share: bool = False,
    like: ModelRunner | None = None,
    cache: PrefixCache | None = None,
) -> tuple[ModelRunner, list[int], dict[int, str]]:
    """Cache every prompt but its last token (the first decode step feeds that one, like every later last token).

    prompts[i] is what the model reads for requests[i] (the request's ids, or a draft's own view of them).
    share: requests with the same image and leading tokens prefill them once (prefix.py); with a cache, a request
    whose prefix an earlier admission prefilled starts from it, and the prefixes prefilled now are kept for later
    ones (prefix_cache.py).
    like: the runner the rows go to; the prefill runs through its forms (lean, compiled) and cache layout.
    Returns a runner whose rows [0, len(good)) hold the good requests, row j holding requests[good[j]], and an
    error message for each of the others.
    """
    token = image_token_id(model)
    keys = [group_key(r, p, token, use_images) if share else None for r, p in zip(requests, prompts)]
    hits = _cached_prefixes(cache, keys, prompts)
    fresh = [i for i in range(len(requests)) if i not in hits]
    features: list[torch.Tensor | str | None] = [None] * len(requests)
    if use_images:  # a request starting from a cached prefix needs no image features: the prefix holds them
        for i, found in zip(fresh, image_features([requests[i] for i in fresh], model, share)):
            features[i] = found
    errors = {i: f for i, f in enumerate(features) if isinstance(f, str)}
    good = [i for i in range(len(requests)) if i not in errors]
    groups = []
    if share:
        alike = [i for i in good if i not in hits]
        found = shared_prefixes([requests[i] for i in alike], [prompts[i] for i in alike], token, use_images)
        groups = [SharedPrefix(tuple(alike[k] for k in g.members), g.length) for g in found]
    if good:
        runner, good = _prefill_rows(model, prompts, features, good, groups, hits, cache, capacity, lean, like)
    else:
        runner = _scratch(model, 1, capacity, lean, like)
    if cache is not None:
        cache.hits += len(hits)
        _keep(cache, runner, good, hits, keys, prompts)
    return runner, good, errors


def _cached_prefixes(
    cache: PrefixCache | None, keys: list[tuple | None], prompts: list[list[int]]
) -> dict[int, tuple[int, int]]:
    """request -> (cache entry row, slots to copy from it), for the requests whose prefix the cache holds."""
    hits = {}
    for i, key in enumerate(keys):
        found = None if cache is None or key is None else cache.find(key, prompts[i][:-1])
        # Every image token must come from the entry: the rest of a prompt is prefilled as text.
        if found is not None and found[1] >= max(1, len(key[1])):
            hits[i] = found
    return hits


def _keep(
    cache: PrefixCache,
    runner: ModelRunner,
    good: list[int],
    hits: dict[int, tuple[int, int]],
    keys: list[tuple | None],
    prompts: list[list[int]],
) -> None:
    """Keep what rows of `runner` (row j holding requests[good[j]]) now hold as the cache's entries: for each key,
    the cached prompt of its first request, whose first slots are the key's prefix. A copy, and cheap beside the
    prefill that computed it, so every key is kept and the least recently used ones make way."""
    for row, i in enumerate(good):
        if keys[i] is not None and i not in hits:
            cache.store(keys[i], prompts[i][:-1], runner, row)


def _prefill_rows(
    model: torch.nn.Module,
    prompts: list[list[int]],
    features: list[torch.Tensor | None],
    good: list[int],
    groups: list[SharedPrefix],
    hits: dict[int, tuple[int, int]],
    cache: PrefixCache | None,
    capacity: int,
    lean: LeanLlama | None,
    like: ModelRunner | None,
) -> tuple[ModelRunner, list[int]]:
    """The good requests' cached prompts, in one pass, or two where some start from a shared prefix: first the
    long rows, each group's prefix (one row per group) and the whole prompt of each request that shares nothing;
    then, after a copy of its group's prefix or of its cache entry (hits: request -> entry row, its slots to copy),
    the rest of each prompt that shares one. A pass runs every row to its longest row's width, so a whole prompt
    must not ride with the short rests: beside an image of thousands of tokens it would make every rest as long.
    With nothing shared (or whole prompts no longer than the rests) it is one pass. Returns the runner and the
    requests its rows hold: the grouped ones first, then the cached ones, then the others."""
    grouped = [i for g in groups for i in g.members]
    found = [i for i in good if i in hits]
    alone = [i for i in good if i not in set(grouped) and i not in hits]
    order = grouped + found + alone
    starts = [g.length for g in groups for _ in g.members] + [hits[i][1] for i in found]
    rests = [prompts[i][start:-1] for i, start in zip(grouped + found, starts)]
    shortest_whole = min((len(prompts[i]) - 1 for i in alone), default=0)
    # Whole prompts go in the first pass when there is one anyway, or when they would stretch the rests' pass.
    apart = bool(alone) and (bool(groups) or (bool(found) and shortest_whole > 2 * max(map(len, rests))))
    first_pass = alone if apart else []  # the whole prompts that join the group prefixes' pass
    if not apart:
        rests += [prompts[i][:-1] for i in alone]
        starts += [0] * len(alone)
    width = max(map(len, rests), default=0)
    runner = _scratch(model, len(order), max(capacity, max(starts, default=0) + width), lean, like)
    first_rows = [prompts[g.members[0]][: g.length] for g in groups] + [prompts[i][:-1] for i in first_pass]
    if first_rows:
        first = _scratch(model, len(first_rows), capacity, lean, like)
        first_features = [features[g.members[0]] for g in groups] + [features[i] for i in first_pass]
        _cache(model, first, first_rows, first_features)
        sources = [k for k, g in enumerate(groups) for _ in g.members] + list(range(len(groups), len(first_rows)))
        rows = list(range(len(grouped))) + list(range(len(order) - len(first_pass), len(order)))
        runner.take_rows(rows, first, sources)
    if found:
        rows = list(range(len(grouped), len(grouped) + len(found)))
        entries = torch.tensor([hits[i][0] for i in found], dtype=torch.long, device=model.device)
        copied = [hits[i][1] for i in found]
        # Only the slots a row shares with its entry: an entry may hold a longer prompt than this runner's rows.
        index = torch.tensor(rows, dtype=torch.long, device=model.device)
        runner.cache.take_rows(index, cache.runner.cache, max(copied), entries)
        runner.set_lengths(rows, torch.tensor(copied, device=model.device), copied)
    if rests:
        # A copied prefix holds every image token of its prompt: only whole prompts show images.
        shown = [None] * (len(grouped) + len(found)) + [features[i] for i in alone if not apart]
        _cache(model, runner, rests, shown)
    return runner, order


def _scratch(
    model: torch.nn.Module, rows: int, capacity: int, lean: LeanLlama | None, like: ModelRunner | None
) -> ModelRunner:
    return ModelRunner(model, rows, capacity, lean=lean) if like is None else like.scratch(rows, capacity)


def _cache(
    model: torch.nn.Module, runner: ModelRunner, cached: list[list[int]], features: list[torch.Tensor | None]
) -> None:
    """Runner's rows [0, len(cached)) cache cached[row] after what they hold, its image placeholders replaced by
    features[row] (all of that row's image features, or None)."""
    lengths = [len(c) for c in cached]
    width = max(lengths)
    tokens = torch.zeros(len(cached), width, dtype=torch.long, device=model.device)
    for row, ids in enumerate(cached):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=model.device)
    embeds = None
    images = [f for f in features if f is not None]
    if images:
        token = image_token_id(model)
        filled = torch.arange(width, device=model.device)[None, :] < torch.tensor(lengths, device=model.device)[:, None]
        placeholders = (tokens == token) & filled
        table = model.get_input_embeddings()
        # Placeholder ids may lie outside the embedding table; their embeddings are replaced anyway.
        embeds = table(tokens.masked_fill(placeholders, 0) if token >= table.num_embeddings else tokens)
        embeds[placeholders] = torch.cat(images).to(embeds.dtype)
    runner.extend(tokens, lengths, inputs_embeds=embeds)

"""Prefill sharing: requests that show the same image behind the same leading tokens prefill that prefix once.

Several prompts about one image (VQA questions, a short and a long caption) differ only after the image: a LLaVA
prompt is "USER: <image>\\n{question} ASSISTANT:", so its hundreds of image tokens come before anything that
differs. Such requests form a group; the group's prefix (the longest common start of its members' cached prompts,
always covering every image token) runs through the vision tower and the model once, each member's row takes a
copy of the prefix's keys and values, and only the rest of each prompt is prefilled per row, at positions that
continue where the prefix ends (prefill.py does the passes).

The copy is exact: the keys and values of a prefix depend only on its tokens, its image features and their
positions, never on what follows them (attention is causal), so a row that starts from the copy holds what its own
prefill would have computed. The group key is therefore what those depend on: the image's content and the tokens
up to and including the image. The content is the request's `image_key` (a hash of the image's bytes, set by
the caller) or else a hash of its pixel values: a file name is never part of it, so two different images under
one name never share, and one image under two names may.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from specvlm.specdec.requests import Request


def image_key(request: Request) -> str | None:
    """What a request's image features are a function of: its image content (None: no image)."""
    if request.pixel_values is None:
        return None
    if request.image_key is not None:
        return request.image_key
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (request.pixel_values, request.image_sizes):
        if tensor is not None:
            host = tensor.detach().to("cpu").contiguous()
            digest.update(f"{host.dtype}{tuple(host.shape)}".encode())
            digest.update(host.reshape(-1).view(torch.uint8).numpy())
    return "pixels:" + digest.hexdigest()


@dataclass(frozen=True)
class SharedPrefix:
    members: tuple[int, ...]  # indices of the requests starting with this prefix (two or more)
    length: int  # tokens they share: every image token, and the text around them up to where they differ


def shared_prefixes(
    requests: list[Request], prompts: list[list[int]], image_token_id: int | None, use_images: bool
) -> list[SharedPrefix]:
    """Groups of requests whose cached prompts (all but the last token: see prefill.py) start alike.

    prompts[i] is what the model reads for requests[i]: its ids, or (use_images False) a text draft's view of them
    without image tokens, which still shares the text around the image. Requests without an image never group."""
    groups: dict[tuple, list[int]] = {}
    for i, (request, prompt) in enumerate(zip(requests, prompts)):
        key = group_key(request, prompt, image_token_id, use_images)
        if key is not None:
            groups.setdefault(key, []).append(i)
    shared = []
    for (_, image_prefix), members in groups.items():
        length = common_length([prompts[i][:-1] for i in members])
        # The rest of each prompt is prefilled as text: the prefix must hold every image token (a prompt ending in
        # one caches it only in its first decoding step).
        if len(members) > 1 and length >= max(1, len(image_prefix)):
            shared.append(SharedPrefix(tuple(members), length))
    return shared


def group_key(request: Request, prompt: list[int], image_token_id: int | None, use_images: bool) -> tuple | None:
    """What the cached prefix of requests sharing it is a function of (None: the request has no image to share).
    Where the model sees the image, the prefix must hold all of it: the key takes the tokens up to its end. A text
    view's cache depends on its tokens alone, so its members share whatever start they have in common."""
    key = image_key(request)
    if key is None:
        return None
    return key, tuple(prompt[: image_end(prompt, image_token_id) if use_images else 0])


def image_end(ids: list[int], image_token_id: int | None) -> int:
    """Tokens of `ids` up to and including its last image token."""
    return 1 + max(j for j, t in enumerate(ids) if t == image_token_id)


def common_length(sequences: list[list[int]]) -> int:
    """Length of the longest common start of `sequences`."""
    length = 0
    for column in zip(*sequences):
        if any(t != column[0] for t in column):
            break
        length += 1
    return length

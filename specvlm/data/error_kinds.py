"""Stable kinds of per-sample errors. An error row's message starts with its kind, `kind: detail`: the detail
names the record and says what to do, the kind groups rows by cause (the manifest's `error_breakdown`) and is
what to filter on (`df[df.error.str.startswith("image_unreadable:")]`)."""

from __future__ import annotations

KINDS = {
    "image_missing": "the record has no image: no image file or member, no image bytes, a caption without one",
    "image_unreadable": "the image bytes are empty, corrupt, truncated or not an image",
    "image_too_large": "over compute.max_pixels (a possible decompression bomb)",
    "image_too_small": "a side under the minimum",
    "record_invalid": "the record is malformed: a bad JSON sidecar or line, a duplicate key, a repeated tar member",
    "read_failed": "the record's files could not be read",
    "missing_field": "the task needs a field the record lacks (vqa: a question; mc: a question and choices)",
    "preprocess_failed": "the target's processor failed on the record",
    "too_long": "the prompt leaves no room for output in the target's positions",
    "decode_failed": "the engine refused the request or failed while decoding it",
}
OTHER = "other"  # a message without a known kind (output written before kinds existed)


def tagged(kind: str, detail: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown error kind {kind!r}; one of {', '.join(KINDS)}")
    return f"{kind}: {detail}"


def kind_of(message: str) -> str:
    kind = message.split(":", 1)[0]
    return kind if kind in KINDS else OTHER

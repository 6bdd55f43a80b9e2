"""Job configuration: typed, loaded from YAML, overridable with `--set a.b=value`, validated before any work.

Every error names the field it is about. Credentials never appear here: object storage is reached through the
standard credential chains (environment, ~/.aws, instance roles); `storage_options` carries only settings such
as an endpoint URL, and keys that look like secrets are refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specvlm.data.prompts import DEFAULT_CAPTION_INSTRUCTION

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


class ConfigError(ValueError):
    pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_protocol(uri: str | None) -> str | None:
    """A URI whose protocol fsspec cannot open fails here, naming its field, not as a traceback mid-run."""
    if uri and "://" in uri:
        import fsspec

        protocol = uri.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise ValueError(
                f"unknown protocol {protocol!r}; use a local path, s3://, gs://, ... (any fsspec protocol)"
            ) from None
        except ImportError as exc:
            raise ValueError(f"protocol {protocol!r} needs a package that is not installed: {exc}") from None
    return uri


def _no_secrets(options: dict) -> dict:
    for name in options:
        if any(word in name.lower() for word in SECRET_WORDS):
            raise ValueError(
                f"storage option {name!r} looks like a credential; credentials must not be written in a config: "
                "use the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) "
                "or the provider's credential files"
            )
    return options


class InputConfig(Section):
    uri: str  # directory, file or glob, any fsspec URI
    format: Literal["auto", "images", "webdataset", "parquet"] = "auto"
    files_per_shard: int = Field(1000, ge=1)  # image folders only
    max_shards: int | None = Field(None, ge=1)  # only the first N shards (in sorted order): trials, evaluations
    image_column: str = "image"  # parquet only
    # Task fields taken from a record's metadata under another name, e.g. {question: mc_question}.
    fields: dict[Literal["caption", "question", "choices", "answer"], str] = Field(default_factory=dict)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # How long a shard's reads keep retrying object-storage faults (with backoff) before the shard is given up as
    # failed: the job finishes the others, then exits non-zero naming it, and a rerun retries it.
    retry_for_s: float = Field(60.0, ge=0)
    _check_secrets = field_validator("storage_options")(_no_secrets)
    _check_uri = field_validator("uri")(_known_protocol)


class OutputConfig(Section):
    uri: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    max_error_fraction: float = Field(0.05, ge=0.0, le=1.0)  # the job fails above this fraction of error rows
    retry_for_s: float = Field(60.0, ge=0)  # how long a shard's file write keeps retrying before the shard fails
    _check_secrets = field_validator("storage_options")(_no_secrets)
    _check_uri = field_validator("uri")(_known_protocol)


class TaskConfig(Section):
    kind: Literal["caption", "vqa", "mc"] = "caption"
    caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION
    mc_suffix: str = ""  # appended to a multiple-choice prompt, e.g. " think step by step."
    template: str = "chat"  # "chat": the processor's chat template; else a format string with {instruction}


class ModelConfig(Section):
    target: str  # local directory, Hugging Face model id (already in the local cache), or fsspec URI
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    storage_options: dict[str, Any] = Field(default_factory=dict)
    _check_secrets = field_validator("storage_options")(_no_secrets)
    _check_uri = field_validator("target")(_known_protocol)


class TreeConfig(Section):
    """Dynamic tree drafting (model drafts); the tree's depth is draft.gamma."""

    topk: int = Field(2, ge=1)  # children per expanded node (defaults tuned on the demo family: README, Benchmarks)
    beam: int = Field(2, ge=1)  # nodes expanded per level
    max_nodes: int = Field(16, ge=1)  # nodes verified per row and step
    min_score: float = Field(0.0, ge=0.0, lt=1.0)  # path probability below which nodes are not expanded


class DraftConfig(Section):
    kind: Literal["none", "text", "vlm", "prompt_lookup"] = "none"
    path: str | None = None
    mode: Literal["chain", "tree"] = "chain"  # tree: model drafts only
    gamma: int = Field(5, ge=1, le=32)  # chain length, or tree depth
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0)  # chain: stop drafting when the draft is less sure
    tree: TreeConfig = Field(default_factory=TreeConfig)
    max_ngram: int = Field(3, ge=1)  # prompt lookup
    min_ngram: int = Field(1, ge=1)
    _check_uri = field_validator("path")(_known_protocol)

    @model_validator(mode="after")
    def _tree_needs_a_model(self):
        if self.mode == "tree" and self.kind not in ("text", "vlm"):
            raise ValueError(f"mode 'tree' needs a model draft (kind text or vlm), not {self.kind!r}")
        return self


class DecodeSettings(Section):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0


class ComputeConfig(Section):
    actors: int = Field(1, ge=1)  # decode actors (each holds target + draft)
    # Input shards read at once, per decode actor. Rows reach the actors in about the order they are read, so
    # these shards, plus the batches queued at each actor, are all a crash can lose (README, Fault behaviour).
    shards_per_actor: int = Field(2, ge=1)
    num_gpus: float | Literal["auto"] = "auto"  # per actor; auto: 1 when the cluster has GPUs, else 0 (CPU)
    cpus_per_actor: float = Field(1.0, gt=0)
    # Intra-op threads of each decode actor (default: its cpus_per_actor, as Ray sets it). More than that can
    # pay when the CPU stages are light, as on a small machine running the demo.
    torch_threads: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)  # rows per engine call
    # Cache slots per engine call (prompt + generated tokens per row): bounds actor memory when prompts are long;
    # a batch over it is split. A row alone is never split.
    max_batch_tokens: int = Field(32768, ge=1)
    preprocess_workers: int = Field(1, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)  # larger images are refused before decoding (bomb guard)


class RayConfig(Section):
    address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: int | None = None  # local Ray only


class JobConfig(Section):
    input: InputConfig
    output: OutputConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig
    draft: DraftConfig = Field(default_factory=DraftConfig)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def output_hash(self, weights: dict[str, str]) -> str:
        """A hash of everything that shapes the generated text (not paths, compute or storage settings). weights:
        fingerprints of the checkpoints (models.loading.weights_fingerprint), so that a model retrained under the
        same path never resumes into output made by the old one."""
        shaping = {
            "task": self.task.model_dump(),
            "target": self.model.target,
            "dtype": self.model.dtype,
            "draft": self.draft.model_dump(),
            "decode": self.decode.model_dump(),
            "weights": weights,
        }
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]

    def draft_name(self) -> str:
        if self.draft.kind in ("none", "prompt_lookup"):
            return self.draft.kind
        return f"{self.draft.kind}-{self.draft.mode}:{self.draft.path}"


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'decode.gamma=3' -> ('decode.gamma', 3); the value is read as YAML, so numbers and booleans work."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc)
        raise ConfigError(f"--set {key.strip()}: {raw!r} is not a valid YAML value ({problem}); quote it") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for text in overrides:
        _set_path(tree, *parse_override(text))
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _describe(exc: ValidationError, path) -> str:
    lines = [f"invalid job config{f' {path}' if path else ''}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = "unknown field (check its spelling and section)" if err["type"] == "extra_forbidden" else err["msg"]
        # Never echo storage options back: a rejected one may be a credential.
        quiet = err["type"] in ("missing", "extra_forbidden") or "storage_options" in err["loc"]
        shown = "" if quiet else f" (got {err.get('input')!r})"
        lines.append(f"  {field}: {message}{shown}")
    return "\n".join(lines)

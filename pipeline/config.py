"""Job configuration: typed, loaded from YAML, overridable with `--set a.b=value`, validated before any work.

Every error names the field it is about. Credentials never appear here: object storage is reached through the
standard credential chains (environment, ~/.aws, instance roles); `storage_options` carries only settings such
as an endpoint URL, and keys that look like secrets are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specvlm.data.prompts import DEFAULT_CAPTION_INSTRUCTION
from specvlm.engine import DraftSettings, TargetSettings
from specvlm.specdec.sampling import SamplingParams

PROMPT_NAME = re.compile(r"[A-Za-z0-9_-]+")
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
    uri: str  # directory, file or glob, any fsspec URI; for a benchmark layout its annotation file
    # Shards (auto: tars, else parquet, else images), or a benchmark layout (specvlm/data/benchmarks.py).
    format: Literal["auto", "images", "webdataset", "parquet", "coco", "vqav2", "scienceqa", "jsonl", "hf"] = "auto"
    # Image folders and benchmark layouts: samples per shard (one output file each). A folder's may change between
    # runs of one job: the files written before are kept, only new images are cut anew (pipeline/resume.py).
    files_per_shard: int = Field(1000, ge=1)
    max_shards: int | None = Field(None, ge=1)  # only the first N shards (in sorted order): trials, evaluations
    image_column: str = "image"  # parquet and hf inputs
    images: str | None = None  # benchmark layouts: root of the image files (default: beside the annotations)
    annotations: str | None = None  # vqav2: the answers file (default: the one named like the questions file)
    split: str | None = None  # scienceqa, hf: the split to read
    # Task fields taken from a record's metadata under another name, e.g. {question: mc_question}.
    fields: dict[Literal["caption", "question", "choices", "answer", "references"], str] = Field(default_factory=dict)
    storage_options: dict[str, Any] = Field(default_factory=dict)  # fsspec settings (endpoint_url, ...), no credentials
    # How long a shard's reads keep retrying object-storage faults (with backoff) before the shard is given up as
    # failed: the job finishes the others, then exits non-zero naming it, and a rerun retries it.
    retry_for_s: float = Field(60.0, ge=0)
    # The most one object-storage request may take, its reply body included (S3). A reply that arrives slower,
    # a few bytes at a time, is cut at this deadline and the read retried; that time counts against retry_for_s.
    # The default passes a 50 MiB read block (s3fs's) at 170 KiB/s.
    request_deadline_s: float = Field(300.0, gt=0)
    _check_secrets = field_validator("storage_options")(_no_secrets)
    _check_uri = field_validator("uri")(_known_protocol)

    @model_validator(mode="after")
    def _layout_options_need_a_layout(self):
        for name in ("images", "annotations", "split"):
            if getattr(self, name) is not None and self.format in ("auto", "images", "webdataset", "parquet"):
                raise ValueError(f"input.{name} applies to the benchmark layouts only, not to format {self.format!r}")
        return self


class OutputConfig(Section):
    uri: str  # the folder of Parquet files and _manifest.json, any fsspec URI
    storage_options: dict[str, Any] = Field(default_factory=dict)  # fsspec settings (endpoint_url, ...), no credentials
    max_error_fraction: float = Field(0.05, ge=0.0, le=1.0)  # the job fails above this fraction of error rows
    retry_for_s: float = Field(60.0, ge=0)  # how long a shard's file write keeps retrying before the shard fails
    _check_secrets = field_validator("storage_options")(_no_secrets)
    _check_uri = field_validator("uri")(_known_protocol)


class TaskConfig(Section):
    kind: Literal["caption", "vqa", "mc"] = "caption"  # vqa: the record's question; mc: its question and choices
    caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION  # what a caption prompt asks for
    mc_suffix: str = ""  # appended to a multiple-choice prompt, e.g. " think step by step."
    # How a multiple-choice prompt asks. cot: the question and its choices, the model reasons before it names a
    # letter (the demo family answers so). direct: the same plus "Answer with the option's letter from the given
    # choices directly.", as LLaVA-1.5's and lmms-eval's published ScienceQA numbers are made.
    mc_protocol: Literal["cot", "direct"] = "cot"
    template: str = "chat"  # "chat": the processor's chat template; else a format string with {instruction}
    # Several prompts per record, name -> instruction, e.g. {short: "Describe the image in one sentence.",
    # long: "Describe the image in detail."}: one output row per record and prompt, keyed "<record key>#<name>".
    # In a vqa or mc prompt, {question} stands for the record's question (with its choices). The rows of one image
    # reach the engine together and share its prefill, also across admissions (compute.share_image_prefill).
    # Empty: one row per record, the task's own prompt.
    prompts: dict[str, str] = Field(default_factory=dict)

    @field_validator("prompts")
    @classmethod
    def _prompt_names(cls, prompts: dict[str, str]) -> dict[str, str]:
        for name in prompts:
            if not PROMPT_NAME.fullmatch(name):
                raise ValueError(f"prompt name {name!r} must be letters, digits, '_' or '-' (it ends the output key)")
        return prompts

    @model_validator(mode="after")
    def _questions_in_prompts(self):
        if self.kind != "caption":
            for name, text in self.prompts.items():
                if "{question}" not in text:
                    raise ValueError(
                        f"prompts entry {name!r} of a {self.kind} task must contain {{question}}, where the "
                        "record's question goes"
                    )
        return self


@dataclasses.dataclass(frozen=True)
class DecodeSettings(SamplingParams):
    """The engine's sampling parameters (temperature, top_k, top_p), plus the job's generation length and seed."""

    max_new_tokens: int = 64  # per sample; the model's positions may end a sample sooner (stop_reason max_positions)
    seed: int = 0  # per-sample seeds derive from it, the shard and the key: reruns sample alike
    # The target's LM head in float32 at every verified position (and the final norm where the lean forward
    # runs), so that in bf16 a verification window and a one-token pass break near-ties alike. Costs one wider
    # matmul per step.
    float32_head: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class ComputeConfig(Section):
    actors: int = Field(1, ge=1)  # decode actors (each holds target + draft)
    # Input shards read at once, per decode actor. Rows reach the actors in about the order they are read, so
    # these shards, plus the batches queued at each actor, are all a crash can lose (docs/faults.md, What a crash
    # can lose).
    shards_per_actor: int = Field(2, ge=1)
    num_gpus: float | Literal["auto"] = "auto"  # per actor; auto: 1 when the cluster has GPUs, else 0 (CPU)
    cpus_per_actor: float = Field(1.0, gt=0)  # CPUs Ray reserves for each decode actor
    # Intra-op threads of each decode actor (default: its cpus_per_actor, as Ray sets it). More than that can
    # pay when the CPU stages are light, as on a small machine running the demo.
    torch_threads: int | None = Field(None, ge=1)
    # Rows each decode actor decodes together (continuous batching: a finished row is refilled at once).
    # auto: calibrated on the first requests, grown while tokens/s rises, within max_batch_tokens.
    batch_size: int | Literal["auto"] = "auto"
    # Cache slots of an actor's running batch (each row: prompt + output + one draft window): bounds its memory.
    max_batch_tokens: int = Field(32768, ge=1)
    # torch.compile the decode steps (the target's and the draft's forwards): on a GPU they replay as CUDA graphs.
    # auto: on where decode actors have GPUs; on a CPU only for a job long enough to repay the warm-up (about a
    # minute per actor; pipeline/compiling.py). Output is the same either way; the manifest says what ran.
    compile: Literal["auto", "on", "off"] = "auto"
    max_pixels: int = Field(40_000_000, ge=1)  # larger images are refused before decoding (bomb guard)
    # Rows showing the same image (by content: a hash of its bytes, never its name) behind the same prompt start
    # prefill it once, in the target and in the draft; the output is the same either way (false: every row
    # prefills its whole prompt, for comparison).
    share_image_prefill: bool = True

    @field_validator("compile", mode="before")
    @classmethod
    def _on_off(cls, value):
        # YAML reads on and off, unquoted, as booleans: `compile: on` in a file and `--set compute.compile=on`.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be 'auto' or >= 1")
        return value


class RayConfig(Section):
    address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: int | None = None  # local Ray only


class JobConfig(Section):
    input: InputConfig
    output: OutputConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: TargetSettings
    draft: DraftSettings = Field(default_factory=DraftSettings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def output_hash(self, weights: dict[str, str]) -> str:
        """A hash of everything that shapes the generated text (not paths, compute or storage settings). weights:
        fingerprints of the checkpoints (models.checkpoints.weights_fingerprint), so that a model retrained under the
        same path never resumes into output made by the old one."""
        sections = self.model_dump(mode="json")
        shaping = {
            "task": sections["task"],
            "target": self.model.target,
            "dtype": self.model.dtype,
            "draft": sections["draft"],
            "decode": sections["decode"],
            "weights": weights,
        }
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]

    @field_validator("model")
    @classmethod
    def _no_secrets_in_model_options(cls, model: TargetSettings) -> TargetSettings:
        _no_secrets(model.storage_options)
        return model


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'draft.gamma=3' -> ('draft.gamma', 3); the value is read as YAML, so numbers and booleans work."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc)
        raise ConfigError(f"--set {key.strip()}: {raw!r} is not a valid YAML value ({problem}); quote it") from None


# Fields that hold a location. A relative local path written in a config file is relative to that file's folder
# (values given with --set are relative to the current directory, as on any command line). Model locations may
# also be Hugging Face model ids ("llava-hf/llava-1.5-7b-hf"): those are resolved only when the path exists.
PATH_FIELDS = ("input.uri", "input.images", "input.annotations", "output.uri")
MODEL_PATH_FIELDS = ("model.target", "draft.path")


def rebase(value, folder: Path):
    """A relative local path written in a file in `folder`, as a path relative to the current directory (from
    the project root `configs/../assets/x` is `assets/x`; Ray workers share the driver's working directory, or a
    copy of it on a cluster, so they find it too). URIs, absolute paths and anything else come back as they are."""
    if not isinstance(value, str) or not value or "://" in value or os.path.isabs(value) or value.startswith("~"):
        return value
    return os.path.relpath(os.path.join(os.path.abspath(folder), value))


def resolve_relative_path(field: str, value, folder: Path):
    """`value` of the dotted `field`, written in a config file in `folder`: rebased when the field holds a
    location (PATH_FIELDS), except a model location that only names a Hugging Face model id."""
    if field not in PATH_FIELDS + MODEL_PATH_FIELDS:
        return value
    resolved = rebase(value, folder)
    if field in MODEL_PATH_FIELDS and not os.path.exists(resolved):
        return value
    return resolved


def resolve_relative_paths(tree: dict, folder: Path) -> None:
    """resolve_relative_path for every location in a config file's `tree`."""
    for dotted in PATH_FIELDS + MODEL_PATH_FIELDS:
        section, name = dotted.split(".")
        values = tree.get(section)
        if isinstance(values, dict) and name in values:
            values[name] = resolve_relative_path(dotted, values[name], folder)


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
        resolve_relative_paths(tree, Path(path).parent)
    for text in overrides:
        _set_path(tree, *parse_override(text))
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _fields(section) -> set[str]:
    if isinstance(section, type) and issubclass(section, BaseModel):
        return set(section.model_fields)
    return {f.name for f in dataclasses.fields(section)} if dataclasses.is_dataclass(section) else set()


def _section(loc: tuple) -> type | None:
    """The config class at a location of the job config, e.g. ("draft", "tree") -> TreeSettings."""
    section = JobConfig
    for part in loc:
        if part not in _fields(section):
            return None
        if isinstance(section, type) and issubclass(section, BaseModel):
            section = section.model_fields[part].annotation
        else:
            section = typing.get_type_hints(section)[part]
    return section


def _field_loc(loc: tuple) -> tuple:
    """The location without pydantic's union-member parts (draft.gamma.int -> draft.gamma)."""
    for end in range(len(loc), 0, -1):
        if loc[end - 1] in _fields(_section(loc[: end - 1])):
            return loc[:end]
    return loc


def _describe(exc: ValidationError, path) -> str:
    messages: dict[tuple, list[str]] = {}  # field -> what is wrong with it
    for err in exc.errors():
        loc, message = tuple(err["loc"]), err["msg"]
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            messages.setdefault(loc, []).append("unknown field (check its spelling and section)")
            continue
        if err["type"] == "value_error":
            # A section's own check ("gamma must be ...") names the field: report it at that field.
            message = message.removeprefix("Value error, ")
            name = message.split(" ", 1)[0]
            if name in _fields(_section(loc)):
                loc, message = (*loc, name), message.split(" ", 1)[1]
        loc = _field_loc(loc)
        # Echo only plain values back, never a section, and never storage options: a rejected one may be a
        # credential.
        value = err.get("input")
        quiet = err["type"] == "missing" or "storage_options" in loc or isinstance(value, (dict, list))
        messages.setdefault(loc, []).append(message + ("" if quiet else f" (got {value!r})"))
    lines = [f"invalid job config{f' {path}' if path else ''}:"]
    for loc, found in messages.items():
        # A value outside a union fails each of its members: one line, the alternatives joined.
        lines.append(f"  {'.'.join(map(str, loc)) or '(top level)'}: {'; or '.join(dict.fromkeys(found))}")
    return "\n".join(lines)

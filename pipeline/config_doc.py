"""The page of every config field (docs/configuration-fields.md), generated from the classes that define them.

    python -m pipeline.config_doc > docs/configuration-fields.md

pipeline/config.py (with the engine's settings it takes as sections) stays the one place a field is defined and
documented: a field's meaning is its pydantic `description`, else the comment on its own lines, else the comment
lines right above it (a block above a field that has its own comment is a note on what follows, not its meaning).
tests/test_config_doc.py checks that the committed page is what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import JobConfig
from pipeline.evaluation_run import EvaluateConfig
from pipeline.processor import ProcessorConfig

PAGE_COMMAND = "python -m pipeline.config_doc > docs/configuration-fields.md"


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    name: str  # dotted, from the config's top level: "draft.tree.topk"
    type: str
    default: str
    meaning: str


def is_section(annotation) -> bool:
    return isinstance(annotation, type) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation))


def comments_by_field(cls: type) -> dict[str, str]:
    """Field name -> the comment on its definition's own lines, else the comment lines right above it, for the
    fields `cls` itself defines (inherited ones are found in their own class)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number -> comment text
    own_line: set[int] = set()  # lines that hold nothing but a comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
            if not token.line[: token.start[1]].strip():
                own_line.add(token.start[0])
    (class_node,) = ast.parse(source).body
    found = {}
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        lines = [n for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        if not lines:
            start = node.lineno
            while start - 1 in own_line:
                start -= 1
            lines = range(start, node.lineno)
        found[node.target.id] = " ".join(comments[n] for n in lines)
    return found


def field_comment(cls: type, name: str) -> str:
    for owner in cls.__mro__:
        if name in getattr(owner, "__annotations__", {}):
            return comments_by_field(owner).get(name, "")
    return ""


def type_name(annotation) -> str:
    """An annotation as a reader writes values for it: `int | "auto"`, `list[str]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(f'"{arg}"' for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else type_name(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def value_text(value) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def section_fields(section: type) -> list[tuple[str, Any, str, str]]:
    """(name, annotation, default, meaning) of each field of a pydantic model or dataclass, in definition order."""
    rows = []
    if issubclass(section, BaseModel):
        for name, info in section.model_fields.items():
            if info.is_required():
                default = "required"
            elif is_section(info.annotation):
                default = ""
            elif info.default is not PydanticUndefined:
                default = value_text(info.default)
            else:
                default = value_text(info.default_factory())
            rows.append((name, info.annotation, default, info.description or field_comment(section, name)))
        return rows
    hints = typing.get_type_hints(section)
    for spec in dataclasses.fields(section):
        if spec.default is not dataclasses.MISSING:
            default = value_text(spec.default)
        elif spec.default_factory is not dataclasses.MISSING:
            default = "" if is_section(hints[spec.name]) else value_text(spec.default_factory())
        else:
            default = "required"
        rows.append((spec.name, hints[spec.name], default, field_comment(section, spec.name)))
    return rows


def document(section: type, prefix: str = "") -> dict[str, list[FieldDoc]]:
    """Heading -> the fields of `section` and of every section nested in it, each nested section under its own
    dotted heading."""
    pages: dict[str, list[FieldDoc]] = {prefix: []}
    for name, annotation, default, meaning in section_fields(section):
        dotted = f"{prefix}.{name}" if prefix else name
        if is_section(annotation):
            pages.update(document(annotation, dotted))
        else:
            pages[prefix].append(FieldDoc(dotted, type_name(annotation), default, meaning))
    return {heading: fields for heading, fields in pages.items() if fields}


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(fields: list[FieldDoc]) -> list[str]:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for doc in fields:
        default = f"`{cell(doc.default)}`" if doc.default and doc.default != "required" else doc.default
        lines.append(f"| `{doc.name}` | `{cell(doc.type)}` | {default} | {cell(doc.meaning)} |")
    return lines


def page() -> str:
    lines = [
        "# Configuration fields",
        "",
        "Generated from `pipeline/config.py` and the engine settings it uses as sections; do not edit by hand.",
        f"`{PAGE_COMMAND}` regenerates it.",
        "[Configuration](configuration.md) explains how configs are written, overridden and validated.",
        "",
        "## Job config",
        "",
        "The file given with `--config` (`configs/demo.yaml` by default) and every `--set section.field=value`.",
    ]
    for heading, fields in document(JobConfig).items():
        lines += ["", f"### `{heading}`", "", *table(fields)]
    lines += [
        "",
        "## Evaluation config",
        "",
        "The file `jobs.evaluate` reads (`configs/evaluate-demo.yaml` by default): which job config each run starts",
        "from and the `--set` overrides of each task and strategy.",
        "",
        *table(document(EvaluateConfig)[""]),
        "",
        "## `build_processor` config",
        "",
        "`pipeline.processor.ProcessorConfig`: a job config without input and output locations. Its `task`,",
        "`model`, `draft`, `decode` and `compute` sections are the job config's; it adds:",
        "",
        *table(document(ProcessorConfig)[""]),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(page(), end="")

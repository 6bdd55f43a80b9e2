"""The README documents the output table; this keeps the two from drifting apart."""

import re
from pathlib import Path

from pipeline.schema import OUTPUT_SCHEMA


def documented_columns() -> dict[str, str]:
    text = Path(__file__).parents[1].joinpath("README.md").read_text()
    section = text.split("## Output schema", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]+)` \|", section, flags=re.MULTILINE)
    return dict(rows)


def test_readme_schema_lists_every_column_with_its_type_in_order():
    documented = documented_columns()
    assert list(documented) == OUTPUT_SCHEMA.names
    for field in OUTPUT_SCHEMA:
        assert documented[field.name] == str(field.type), field.name

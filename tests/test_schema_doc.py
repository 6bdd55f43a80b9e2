"""docs/output.md documents the output table; this keeps the two from drifting apart."""

import re
from pathlib import Path

from pipeline.schema import OUTPUT_SCHEMA

OUTPUT_PAGE = Path(__file__).parents[1] / "docs" / "output.md"


def documented_columns() -> dict[str, str]:
    section = OUTPUT_PAGE.read_text().split("## Output schema", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]+)` \|", section, flags=re.MULTILINE)
    return dict(rows)


def test_output_page_lists_every_column_with_its_type_in_order():
    documented = documented_columns()
    assert list(documented) == OUTPUT_SCHEMA.names
    for field in OUTPUT_SCHEMA:
        assert documented[field.name] == str(field.type), field.name

"""docs/configuration-fields.md is generated from the config classes; these keep the committed page current."""

from pathlib import Path

from pipeline.config_doc import PAGE_COMMAND, page

FIELDS_PAGE = Path(__file__).parents[1] / "docs" / "configuration-fields.md"


def test_committed_fields_page_is_what_the_config_classes_generate():
    stale = "docs/configuration-fields.md is out of date; regenerate it"
    assert FIELDS_PAGE.read_text() == page(), f"{stale}: {PAGE_COMMAND}"

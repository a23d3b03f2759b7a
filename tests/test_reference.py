"""The README's config reference is the one rendered from the model."""

from __future__ import annotations

from pathlib import Path

from app import reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_config_reference_matches_the_model() -> None:
    text = README.read_text()
    start, end = text.index(reference.BEGIN), text.index(reference.END) + len(reference.END)
    assert text[start:end] == reference.render(), (
        "README's config reference is stale: paste `python -m app.reference` over it"
    )


def test_every_field_is_documented() -> None:
    for row in reference.rows(reference.Config):
        assert not row.endswith("|  |"), f"field without a description: {row}"

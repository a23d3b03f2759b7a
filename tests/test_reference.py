"""The docs' reference pages are the ones rendered from the config model and from the
metric definitions, and those cover every setting and every metric."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lbstack import metric_reference, reference
from lbstack.config import Config
from lbstack.tiers.router import create_forwarder

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("page", reference.PAGES, ids=lambda page: page.path)
def test_reference_page_is_current(page: reference.Page) -> None:
    assert page.current(DOCS) == page.render(), (
        f"docs/{page.path} is stale: run `python -m lbstack.reference` to regenerate it"
    )


def test_regenerating_rewrites_only_the_generated_part(tmp_path: Path) -> None:
    for page in reference.PAGES:
        text = (DOCS / page.path).read_text()
        stale = reference.splice(text, page.begin, page.end, f"{page.begin}\nold\n{page.end}")
        (tmp_path / page.path).write_text(stale)
    assert reference.main(["--docs", str(tmp_path), "--check"]) == 1
    assert reference.main(["--docs", str(tmp_path)]) == 0
    for page in reference.PAGES:
        assert (tmp_path / page.path).read_text() == (DOCS / page.path).read_text()
    assert reference.main(["--docs", str(tmp_path), "--check"]) == 0


def test_a_page_without_markers_is_an_error(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    (tmp_path / "docs" / "metrics.md").write_text("# Metrics\n")
    with pytest.raises(ValueError, match="expected the markers <!-- metrics-reference:begin"):
        reference.main(["--docs", str(tmp_path / "docs")])


def test_every_field_is_documented() -> None:
    for row in reference.rows(reference.Config):
        assert not row.endswith("|  |"), f"field without a description: {row}"


def test_every_metric_is_documented() -> None:
    families = metric_reference.families()
    assert families, "no metric found"
    for family in families:
        assert family.name.startswith("lbstack_"), family
        assert family.help, f"metric without a help text: {family.name}"
        assert family.labels[:2] == ("role", "instance"), family


@pytest.mark.parametrize(("role", "edge"), [("balancer", True), ("proxy", False)])
def test_a_real_router_exports_nothing_undocumented(role: str, edge: bool) -> None:
    """The reference builds each router's registry from the same classes as
    ``create_forwarder``: a family added there must show up here too."""
    tier = Config().balancer if edge else Config().proxy
    _, metrics = create_forwarder(f"{role}-0", role, tier, [], edge=edge)
    exported = {
        f"{m.name}_total" if m.type == "counter" else m.name for m in metrics.registry.collect()
    }
    documented = {f.name for f in metric_reference.families() if role in f.components}
    assert exported <= documented, f"undocumented: {sorted(exported - documented)}"

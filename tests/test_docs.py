"""What the code cites is in the repository: every section of docs/architecture.md
that a docstring, comment or page cites is a heading there, and no citation points
at a document users do not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO / "docs" / "architecture.md"
CITATION = re.compile(r"architecture\.md §(.{0,40})")


def _tracked_texts() -> dict[str, str]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py", "*.md"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return {name: (REPO / name).read_text() for name in listed.stdout.split() if name}


def test_every_citation_of_the_architecture_page_names_one_of_its_sections():
    sections = set(re.findall(r"^## (.+)$", ARCHITECTURE.read_text(), re.M))
    cited = [
        (name, following)
        for name, text in _tracked_texts().items()
        for following in CITATION.findall(" ".join(text.split()))
    ]
    assert len(cited) >= 20
    unknown = [c for c in cited if not any(c[1].startswith(s) for s in sections)]
    assert unknown == []


def test_no_citation_of_a_design_document_users_do_not_have():
    texts = _tracked_texts()
    design = "DESIGN" + " §"  # spelled apart, so this file does not cite it either
    assert [name for name, text in texts.items() if design in text] == []

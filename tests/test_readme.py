"""The README stays a newcomer's page: at most 9,000 characters, opening with the two commands."""

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_is_at_most_9000_characters():
    assert len(README) <= 9000, f"README.md has {len(README)} characters: move detail into docs/"


def test_readme_opens_with_the_two_commands_and_links_every_doc():
    head = README[: README.index("## Results on real data")]
    assert "make repro" in head and "make test" in head
    docs = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    missing = [name for name in docs if f"docs/{name}" not in README]
    assert not missing, f"README links no {missing}"

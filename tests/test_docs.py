"""The documentation site and the README, checked without building them.

CI builds the site with Sphinx and warnings as errors (`.ci/run`); these checks are the cheap part
of that: every page is reachable from the contents, every public name has an entry in the API
reference, and the README stays short, with links that lead somewhere.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"

TOCTREE = re.compile(r"```\{toctree\}\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def pages() -> set[str]:
    return {
        p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md") if "_build" not in p.parts
    }


def toctree_entries(page: str) -> list[str]:
    text = (DOCS / f"{page}.md").read_text()
    entries = []
    for block in TOCTREE.findall(text):
        entries += [
            line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith(":")
        ]
    return entries


def slug(heading: str) -> str:
    """The anchor MyST gives a heading (``myst_heading_anchors``): lower case, punctuation
    dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no headings inside code
    return {slug(m.group(2)) for m in re.finditer(r"^(#{1,3}) (.+)$", text, re.M)}


def test_every_page_is_reachable_from_the_index():
    seen, todo = set(), ["index"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for entry in toctree_entries(page):
            assert entry in pages(), f"{page}.md lists {entry!r}, which is not a page under docs/"
            todo.append(entry)
    assert pages() - seen == set(), f"pages outside every toctree: {sorted(pages() - seen)}"


@pytest.mark.parametrize("package", ["ec_hooks", "lightning_plugin"])
def test_every_public_name_is_in_the_api_reference(package):
    module = pytest.importorskip(package)
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(rf"^\.\. auto(?:class|function|data):: {package}\.(\w+)$", api, re.M))
    assert set(module.__all__) - documented == set(), "add these names to docs/api.md"
    assert documented - set(module.__all__) == set(), "docs/api.md documents names that are not public"


def test_readme_is_short_and_its_links_lead_somewhere():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), f"README links to {path}, which does not exist"
        if anchor:
            assert anchor in anchors(ROOT / path), f"README links to #{anchor}, not a heading of {path}"


def test_readme_names_the_main_job_and_the_test_commands_ci_runs():
    text = README.read_text()
    commands = re.search(r"## Two commands\n(.*?)\n## ", text, re.S).group(1)
    assert 'pip install -e ".[recipes]" && python -m recipes.compare' in commands
    assert 'pip install -e ".[dev]" && python -m pytest -q' in commands
    assert 'python -m pytest -q -m "not slow"' in commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python3? -m pytest -q\b", ci, re.M), (
        ".ci/run no longer runs the README's test command"
    )
    assert re.search(r"^python3? -m sphinx -W\b.* docs ", ci, re.M), (
        ".ci/run no longer builds the docs with -W"
    )


def test_the_wandb_snippets_run_offline_and_name_the_extra():
    for path in (README, DOCS / "getting-started.md", DOCS / "lightning.md"):
        text = path.read_text()
        assert "WandbLogger()" not in text, f"{path.name}: WandbLogger() needs an account"
        assert "WandbLogger(offline=True)" in text, path.name
        assert '".[lightning,wandb]"' in text, path.name

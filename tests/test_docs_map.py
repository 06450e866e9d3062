"""The documentation for people keeps up with the code: docs/architecture.md maps every module of fts_mcp/, and the
README stays a front door (small, its links to docs/ alive)."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fts_mcp"
DOCS = REPO / "docs"
README = REPO / "README.md"
README_LIMIT = 25_000  # bytes: room left for sections still to come

MAP_LINE = re.compile(r"^(fts_mcp/\S+\.py)  — \S")  # `fts_mcp/path/to/module.py  — one-line purpose`
LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown links: [text](target)


def only_a_docstring(path: Path) -> bool:
    """True for a module with no code: an empty body, or a docstring alone."""
    body = ast.parse(path.read_text()).body
    return not body or (len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str))


def modules_in_tree() -> set[str]:
    """Every .py under fts_mcp/, less package __init__.py files that hold only a docstring."""
    return {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
            if not (p.name == "__init__.py" and only_a_docstring(p))}


def module_map() -> tuple[list[str], list[str]]:
    """(the paths listed in docs/architecture.md's module map, the lines of its block not in the map's format)."""
    text = (DOCS / "architecture.md").read_text()
    heading = re.search(r"(?m)^## Module map\s*$", text)
    assert heading, "docs/architecture.md has no '## Module map' section"
    block = re.search(r"(?ms)^```[^\n]*\n(.*?)^```", text[heading.end():])
    assert block, "the '## Module map' section of docs/architecture.md has no fenced block"
    listed, malformed = [], []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        match = MAP_LINE.match(line)
        if match:
            listed.append(match.group(1))
        else:
            malformed.append(line)
    return listed, malformed


def test_module_map_lists_exactly_the_modules_in_the_tree():
    listed, malformed = module_map()
    assert not malformed, ("lines of the module map in docs/architecture.md not written as "
                           f"'fts_mcp/path/to/module.py  — one-line purpose': {malformed}")
    duplicates = sorted({path for path in listed if listed.count(path) > 1})
    assert not duplicates, f"modules listed twice in docs/architecture.md's module map: {duplicates}"
    tree = modules_in_tree()
    missing = sorted(tree - set(listed))
    extra = sorted(set(listed) - tree)
    assert not missing and not extra, (
        "docs/architecture.md's module map is out of date.\n"
        f"  add a line for (in the tree, not in the map): {missing}\n"
        f"  remove (in the map, no such module, or an __init__.py with only a docstring): {extra}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())  # headings only, not `# comments` in code blocks
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def broken_links(page: Path) -> list[str]:
    """Relative links of a markdown page whose file (or heading anchor) does not exist."""
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:, fts: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


def test_readme_is_a_front_door_and_its_links_to_docs_exist():
    size = len(README.read_bytes())
    assert size < README_LIMIT, (f"README.md is {size:,} bytes, over {README_LIMIT:,}: move detail into a docs/ page "
                                 "and link it from where it was")
    text = README.read_text()
    docs_links = {target.partition("#")[0] for target in LINK.findall(text)
                  if re.fullmatch(r"(\./)?docs/[^/]+\.md", target.partition("#")[0])}
    assert docs_links, "README.md links to no docs/*.md page"
    missing = sorted(link for link in docs_links if not (REPO / link).is_file())
    assert not missing, f"README.md links to docs pages that do not exist: {missing}"
    unlinked = sorted(str(p.relative_to(REPO)) for p in DOCS.glob("*.md")
                      if str(p.relative_to(REPO)) not in {link.removeprefix("./") for link in docs_links})
    assert not unlinked, f"docs pages README.md does not link to: {unlinked}"
    assert not broken_links(README), f"broken links in README.md: {broken_links(README)}"


def test_links_between_docs_pages_resolve():
    broken = {str(page.relative_to(REPO)): links for page in sorted(DOCS.glob("*.md")) if (links := broken_links(page))}
    assert not broken, f"broken relative links: {broken}"

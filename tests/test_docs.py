"""The user docs stand on their own: every link resolves inside the repository, and the
configuration reference names every key the config loader accepts."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import parse_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
# Inline links and images `[text](target "title")`, and reference definitions `[id]: target`.
_INLINE = re.compile(r"""!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:"[^"]*"|'[^']*'))?\s*\)""")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def links(path: Path) -> list[str]:
    """Link targets of a Markdown file, outside code blocks and code spans."""
    text = _CODE.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))
    return _INLINE.findall(text) + _REFERENCE.findall(text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to dashes."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_the_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "formats.md", "configuration.md", "runs.md", "operations.md"} <= names


def link_problems(doc: Path, root: Path) -> list[str]:
    """Relative links of `doc` that leave `root`, point nowhere, or name a missing heading."""
    problems = []
    for target in links(doc):
        if _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.is_relative_to(root):
            problems.append(f"{target}: leaves the repository")
        elif not resolved.exists():
            problems.append(f"{target}: {resolved.relative_to(root)} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(root)}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(doc):
    problems = link_problems(doc, REPO)
    assert not problems, f"{doc.relative_to(REPO)}: " + "; ".join(problems)


def test_readme_has_no_link_out_of_the_repository():
    assert not [t for t in links(REPO / "README.md") if t.startswith("../")]


def test_the_link_checker_finds_bad_links(tmp_path):
    """The checks above would pass on a checker that finds nothing: prove it finds these."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "runs.md").write_text("# Runs\n## Exit codes\n")
    doc = root / "README.md"
    doc.write_text(
        "[spec](../shared/SPEC.md) ![img](missing.png 'title') `[code](skipped.md)`\n"
        "```\n[fenced](skipped-too.md)\n```\n"
        "[ok](docs/runs.md#exit-codes) [bad anchor](docs/runs.md#exit-code)\n"
        "[web](https://example.com) [self](#readme)\n"
        "[ref]: docs/runs.md#runs\n")
    assert link_problems(doc, root) == [
        "../shared/SPEC.md: leaves the repository",
        "missing.png: missing.png does not exist",
        "docs/runs.md#exit-code: no heading #exit-code in docs/runs.md",
        "#readme: no heading #readme in README.md",
    ]
    assert {"skipping---force-and-changed-files", "exit-codes"} <= anchors(
        REPO / "docs" / "runs.md")


def config_keys() -> list[set[str]]:
    """Keys of each table, read from the `_known(raw, where, {...})` calls of
    pipeline/config.py: the loader refuses any other key, so these are all of them."""
    tree = ast.parse((REPO / "pipeline" / "config.py").read_text(encoding="utf-8"))
    return [{ast.literal_eval(e) for e in node.args[2].elts} for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "_known" and len(node.args) == 3
            and isinstance(node.args[2], ast.Set)]


def test_configuration_reference_names_every_key():
    tables = config_keys()
    # Found the top level, [state], [profiles], feeds and destinations.
    assert len(tables) >= 5 and {"state", "profiles", "feeds", "destinations",
                                 "executor"} in tables
    reference = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = sorted({k for table in tables for k in table
                      if f"`{k}`" not in reference and f"[{k}]" not in reference})
    assert not missing, ("docs/configuration.md does not describe these config keys "
                         f"(add a row for each): {', '.join(missing)}")


def toml_examples(path: Path) -> list[str]:
    """Whole config files shown in a document (TOML blocks with a [state] table)."""
    blocks = re.findall(r"^```toml\n(.*?)^```", path.read_text(encoding="utf-8"),
                        re.MULTILINE | re.DOTALL)
    return [b for b in blocks if "[state]" in b]


@pytest.mark.parametrize("doc", ["README.md", "docs/configuration.md"])
def test_config_examples_load(doc, tmp_path):
    """The examples users copy are valid configs (SFTP key files swapped for real files)."""
    key_file = tmp_path / "key"
    key_file.write_text("")

    def real_files(table: Any) -> Any:
        if isinstance(table, dict):
            return {k: str(key_file) if k in ("known_hosts", "identity_file") else real_files(v)
                    for k, v in table.items()}
        return [real_files(v) for v in table] if isinstance(table, list) else table

    examples = toml_examples(REPO / doc)
    assert examples
    for text in examples:
        config = parse_config(real_files(tomllib.loads(text)),
                              {"DECLARED_ID_KEY": "00" * 32}, base_dir=tmp_path)
        assert config.feeds and config.destinations

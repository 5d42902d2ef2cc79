"""The repository explains itself: no tracked file points outside it, and every relative link
in a Markdown file and every ``docs/<file>.md`` mention in a tracked text file resolves (with its
``#anchor``, when it names a heading of a Markdown file)."""

import ast
import inspect
import re
import subprocess
import unicodedata
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Files outside the repository (spelled so that this pattern does not match itself).
OUTSIDE = re.compile(r"\.\./shared|spec[/](?:ACTIVE|GREEDY)_LR|(?:ACTIVE|GREEDY)_LR\.md")
# [text](target) or ![alt](target), with an optional "title" after the target.
MARKDOWN_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# docs/... .md as a repository path (not the tail of a longer path or a URL).
DOCS_MENTION = re.compile(r"(?<![\w./-])(docs/[\w./-]*?\.md)(#[\w-]+)?")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    files = {}
    for name in filter(None, names):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            files[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files


TEXT_FILES = _tracked_text_files()
MARKDOWN_FILES = sorted(name for name in TEXT_FILES if name.endswith(".md"))


def _outside_code_blocks(text: str):
    """(line number, line) of every Markdown line outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline markup dropped, lower case, punctuation
    removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


@cache
def anchors(name: str) -> frozenset[str]:
    text = TEXT_FILES.get(name)
    if text is None:
        text = (ROOT / name).read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    result = set()
    for _, line in _outside_code_blocks(text):
        result.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(result)


def _broken(target: Path, anchor: str | None) -> str | None:
    """Why a link to target#anchor (target relative to the repository root) does not resolve."""
    try:
        name = target.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return "points outside the repository"
    if not (ROOT / name).exists():
        return "no such file"
    if anchor and name.endswith(".md") and anchor not in anchors(name):
        return f"no heading with anchor #{anchor}"
    return None


@pytest.mark.parametrize("name", sorted(TEXT_FILES))
def test_no_reference_outside_the_repository(name):
    found = [
        f"{name}:{number}: {match.group()}"
        for number, line in enumerate(TEXT_FILES[name].splitlines(), start=1)
        for match in OUTSIDE.finditer(line)
    ]
    assert not found, "points outside the repository (explain it in docs/):\n" + "\n".join(found)


@pytest.mark.parametrize("name", MARKDOWN_FILES)
def test_markdown_links_resolve(name):
    broken = []
    for number, line in _outside_code_blocks(TEXT_FILES[name]):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in MARKDOWN_LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            resolved = (ROOT / name).parent / path if path else ROOT / name
            why = _broken(resolved, anchor or None)
            if why:
                broken.append(f"{name}:{number}: ({target}) {why}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("name", sorted(TEXT_FILES))
def test_docs_mentions_resolve(name):
    broken = []
    for number, line in enumerate(TEXT_FILES[name].splitlines(), start=1):
        for path, anchor in DOCS_MENTION.findall(line):
            why = _broken(ROOT / path, anchor[1:] or None)
            if why:
                broken.append(f"{name}:{number}: {path}{anchor} {why}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("heading,slug", [
    ("Decisions where the paper's code is ambiguous or buggy",
     "decisions-where-the-papers-code-is-ambiguous-or-buggy"),
    ("AMP: `grad_scale` and `found_inf`", "amp-grad_scale-and-found_inf"),
    ("Params without a gradient: catch-up", "params-without-a-gradient-catch-up"),
    ("[GreedyLR](greedy_lr.md) pairing", "greedylr-pairing"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_checks_catch_broken_references():
    """The checks above fail on what they exist to catch."""
    assert _broken(ROOT / "docs" / "no_such_page.md", None) == "no such file"
    assert _broken(ROOT / "docs" / "algorithm.md", "no-such-heading").startswith("no heading")
    assert _broken(ROOT / "docs" / "algorithm.md", "the-gain-rule") is None
    assert _broken(ROOT.parent / "elsewhere.md", None) == "points outside the repository"
    assert DOCS_MENTION.findall("see docs/algorithm.md#the-epoch-clock.") == [
        ("docs/algorithm.md", "#the-epoch-clock")]
    assert DOCS_MENTION.findall("https://example.org/docs/x.md") == []
    assert MARKDOWN_LINK.findall("[a](b.md#c) ![i](img.png \"t\")") == ["b.md#c", "img.png"]
    outside = "/".join(["see ..", "shared and spec", "GREEDY" + "_LR.md and docs"])
    assert len(OUTSIDE.findall(outside)) == 2


def _documented_defaults() -> tuple[dict[str, dict], dict]:
    """docs/algorithm.md's defaults: per optimizer (its table row, which overrides) and for all
    of them (the sentence under the table)."""
    text = (ROOT / "docs" / "algorithm.md").read_text()
    section = text[text.index("## Hyperparameters, defaults and validation"):]
    pair = re.compile(r"`(\w+)=([^`]+)`")

    def parse(fragment: str) -> dict:
        return {k: ast.literal_eval(v.replace("inf", "1e999")) for k, v in pair.findall(fragment)}

    rows = {m.group(1): parse(m.group(3)) | {k: ast.literal_eval(v) for k, v in
                                             re.findall(r"(\w+)=([^,]+)", m.group(2))}
            for m in re.finditer(r"^\| `(Active\w+)\((.*?)\)` \| (.*) \|$", section, re.M)}
    common = section[section.index("All of them also take"):section.index("Every\nhyperparameter")]
    return rows, parse(common)


def test_documented_defaults_are_the_codes():
    """Every constructor default of every Active optimizer is in docs/algorithm.md's table (or
    the sentence under it) with the value the code has."""
    import adaptive_lr

    rows, everyone = _documented_defaults()
    assert set(rows) == {"ActiveSGD", "ActiveAdamW", "ActiveRAdam", "ActiveAdaBelief",
                         "ActiveAdam", "ActiveLion"}
    for name, row in rows.items():
        signature = inspect.signature(getattr(adaptive_lr, name))
        code = {k: p.default for k, p in signature.parameters.items()
                if p.default is not inspect.Parameter.empty}
        documented = everyone | row
        assert documented == code, name

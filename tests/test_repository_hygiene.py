"""Tracked files stay inside the repository: no paths outside it, no citations of documents users do not have, and
every citation of a `docs/method.md` section names a section that exists.

Runs on `git ls-files`; outside a git checkout (e.g. an unpacked sdist) the tests are skipped.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Spelled with escapes / concatenation so that this file does not match its own patterns.
SECTION_SIGN = "\u00a7"
FORBIDDEN = {
    "a section-sign citation of a private document": re.compile(SECTION_SIGN + r"\s?\d"),
    "a quirk number of a private document": re.compile(r"(?<![\w-])Q(?:[1-9]|[1-9]\d)(?![\w])"),
    "a private specification document": re.compile("ALGORITHM" + r"\.md|PAPER_NUMBERS" + r"\.md|STYLE" + r"\.md"),
    "a folder outside the repository": re.compile(r"\.\./" + "shared|" + "shared/" + "spec"),
    "an absolute path of a development machine": re.compile(r"(?<![\w.])/(?:work|root|home/[^/\s]+)/"),
}
RELATIVE_PATH = re.compile(r"(?<![\w./])((?:\.\./)+)[\w.-]")
METHOD_CITATION = re.compile(r"(?<![\w/-])(?:docs/)?method\.md#([\w-]+)")


def tracked_text_files() -> dict[str, str]:
    """`{path: text}` of every tracked UTF-8 text file (binary files are skipped)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    files = {}
    for name in listing.stdout.decode().split("\0"):
        path = REPO / name
        if not name or not path.is_file():
            continue
        try:
            files[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    assert "README.md" in files and "ivpt/modeling_ivpt.py" in files
    return files


def github_anchor(heading: str) -> str:
    """The anchor GitHub generates for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def method_anchors() -> set[str]:
    text = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_no_tracked_file_points_outside_the_repository():
    problems = []
    for name, text in tracked_text_files().items():
        for number, line in enumerate(text.splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    problems.append(f"{name}:{number}: {what}: {line.strip()[:120]}")
            if name.startswith("tests/"):
                continue  # tests build escaping paths on purpose, as bad input for the data loaders
            for match in RELATIVE_PATH.finditer(line):  # ../ paths must resolve inside the repository
                target = (REPO / name).parent / match.group(1)
                if not target.resolve().is_relative_to(REPO):
                    problems.append(f"{name}:{number}: a relative path leaving the repository: {line.strip()[:120]}")
    assert not problems, "\n".join(problems)


def test_method_citations_name_existing_sections():
    anchors = method_anchors()
    assert {"prototype-assignment-maps", "equivariance-loss", "quirks", "parts-metric-input"} <= anchors
    missing = [
        f"{name}: #{anchor}"
        for name, text in tracked_text_files().items()
        for anchor in METHOD_CITATION.findall(text)
        if anchor not in anchors
    ]
    assert not missing, "citations of sections that docs/method.md does not have:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    "line, what",
    [
        ("see " + SECTION_SIGN + "3.7", "a section-sign citation of a private document"),
        ("(" + "Q" + "20)", "a quirk number of a private document"),
        ("../" + "shared/" + "spec/x", "a folder outside the repository"),
        ("/" + "work/main/x", "an absolute path of a development machine"),
    ],
)
def test_the_patterns_catch_what_they_should(line, what):
    assert FORBIDDEN[what].search(line)


@pytest.mark.parametrize("line", ["QKV projection", "a Q-value", "docs/method.md#quirks", "(B, Q, D)", "/data/CUB"])
def test_the_patterns_leave_ordinary_text_alone(line):
    assert not any(pattern.search(line) for pattern in FORBIDDEN.values())


def test_github_anchor_rules():
    assert github_anchor(" Prototype assignment maps") == "prototype-assignment-maps"
    assert github_anchor("NMI and ARI") == "nmi-and-ari"
    assert github_anchor("Parts-metric input") == "parts-metric-input"
    assert github_anchor("Hard-assignment pooling") == "hard-assignment-pooling"

"""The documentation a user gets is self-contained: no tracked file points outside the repository (the
team's notes, a machine's absolute paths), every Markdown link resolves to a tracked file and heading,
and every reference to docs/METHOD.md names a file and a section that exist."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = "docs/METHOD.md"

# Built from pieces so that this file does not contain what it looks for.
OUTSIDE = [
    ("the team's shared notes", re.compile("shared" + "/")),
    ("an absolute path of a machine", re.compile(r"(?<![\w.:/])/(?:work|tmp|home|root|Users|mnt|scratch)/")),
]
CLIMB = re.compile(r"(?:\.\./)+")  # a relative path that climbs: fine while it stays inside the repository
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
METHOD_REF = re.compile(r"METHOD\.md(#[\w-]+)?(?:\s+sections?\s+(\d+(?:\.\d+)*))?")


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    return [f for f in out.split("\0") if f]


def text_files():
    """(path, text) of every tracked text file (binary files such as the PNGs are skipped)."""
    out = []
    for rel in tracked_files():
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):
            continue  # deleted in the working tree, not yet committed
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue
        try:
            out.append((rel, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def slug(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path):
    """(anchors, section numbers) of a Markdown file; repeated anchors get -1, -2, ... as on GitHub."""
    anchors, numbers, seen = set(), set(), {}
    in_code = False
    with open(path) as f:
        for line in f:
            if line.startswith("```"):
                in_code = not in_code
            m = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
            if not m:
                continue
            base = slug(m.group(1))
            anchors.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
            num = re.match(r"(\d+(?:\.\d+)*)\.?\s", m.group(1))
            if num:
                numbers.add(num.group(1))
    return anchors, numbers


def test_climbing_out_is_told_from_climbing_inside():
    assert not climbs_out("docs/RESULTS.md", "see [the guide](../README.md)")
    assert climbs_out("docs/RESULTS.md", "see " + "../" * 2 + "elsewhere/notes.md")
    assert climbs_out("README.md", "see ../notes.md")


def test_slug_matches_github():
    assert slug("3.1 eps: a quantile over the global batch") == "31-eps-a-quantile-over-the-global-batch"
    assert slug("1. Reward model and the Dr.GRPO update") == "1-reward-model-and-the-drgrpo-update"
    assert slug("4. The bandit toy (Figure 1): `bandit_toy.py`") == "4-the-bandit-toy-figure-1-bandit_toypy"


def climbs_out(rel, text):
    """Every `../` run in a file that climbs above the repository's root from the file's folder (docs/x.md may
    write ../README.md; README.md may not write ../anything)."""
    depth = rel.count("/")
    return [m for m in CLIMB.finditer(text) if m.group(0).count("../") > depth]


def test_no_tracked_file_points_outside_the_repository():
    found = [
        f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {what} ({m.group(0)!r})"
        for rel, text in text_files()
        for what, matches in [(w, list(p.finditer(text))) for w, p in OUTSIDE]
        + [("a relative path that climbs out of the repository", climbs_out(rel, text))]
        for m in matches
    ]
    assert not found, "users get only this repository; point into it instead:\n" + "\n".join(found)


def test_markdown_links_resolve_inside_the_repository():
    tracked = set(tracked_files())
    bad = []
    for rel, text in text_files():
        if not rel.endswith(".md"):
            continue
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            if dest.startswith("..") or os.path.isabs(dest) or dest not in tracked:
                bad.append(f"{rel}: {target} is not a file of the repository")
            elif anchor and dest.endswith(".md") and anchor not in headings(os.path.join(ROOT, dest))[0]:
                bad.append(f"{rel}: {target}: {dest} has no heading with the anchor #{anchor}")
    assert not bad, "\n".join(bad)


def test_method_references_resolve():
    assert METHOD in tracked_files(), f"{METHOD} must be tracked by git: users get only tracked files"
    anchors, numbers = headings(os.path.join(ROOT, METHOD))
    assert {"1", "2", "3", "3.1", "4", "5", "6"} <= numbers, f"{METHOD} lost a numbered section: has {numbers}"
    bad, count = [], 0
    for rel, text in text_files():
        for m in METHOD_REF.finditer(text):
            count += 1
            where = f"{rel}:{text.count(chr(10), 0, m.start()) + 1}"
            if text[max(0, m.start() - 5) : m.start()] != "docs/" and not rel.startswith("docs/"):
                bad.append(f"{where}: write docs/METHOD.md, the file in this repository")
            if m.group(1) and m.group(1)[1:] not in anchors:
                bad.append(f"{where}: {METHOD} has no heading with the anchor {m.group(1)}")
            if m.group(2) and m.group(2) not in numbers:
                bad.append(f"{where}: {METHOD} has no section {m.group(2)}")
    assert count >= 8, f"expected the scripts and the README to point to {METHOD}; found {count} references"
    assert not bad, "\n".join(bad)

"""Same name, same source: a helper that several scripts define is the same code in each.

The scripts share nothing but files on disk, so helpers are copied on purpose; a copy that drifts
(another argument order, another return type, a forgotten fix) is a bug that no other test sees.
    python -m pytest tests/test_shared_helpers.py -q
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in ROOT.glob("*.py"))
# names that differ by design: each script's own flags and presets
ALLOWED_TO_DIFFER = {
    "Args",  # every script has its own arguments
    "PRESETS",  # ... and its own tiny/paper defaults of them
    "main",  # each trainer's training loop: the same outside its method regions (tests/test_trainer_layout.py)
}


def top_level_definitions(text: str) -> dict[str, str]:
    """name -> normalised source (ast.unparse: formatting aside) of every top-level function, class and constant."""
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = ast.unparse(node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = ast.unparse(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = ast.unparse(node)
    return out


def drifted(definitions: dict[str, dict[str, str]]) -> dict[str, list[list[str]]]:
    """name -> the groups of scripts that agree, for every shared name whose copies differ."""
    out = {}
    for name, copies in definitions.items():
        if len(copies) < 2 or name in ALLOWED_TO_DIFFER:
            continue
        groups = {}
        for script, source in copies.items():
            groups.setdefault(source, []).append(script)
        if len(groups) > 1:
            out[name] = sorted(groups.values())
    return out


def all_definitions(sources: dict[str, str]) -> dict[str, dict[str, str]]:
    definitions = {}
    for script, text in sources.items():
        for name, source in top_level_definitions(text).items():
            definitions.setdefault(name, {})[script] = source
    return definitions


def test_every_shared_helper_is_the_same_source_in_every_script():
    sources = {s: (ROOT / s).read_text() for s in SCRIPTS}
    definitions = all_definitions(sources)
    shared = {n for n, c in definitions.items() if len(c) > 1} - ALLOWED_TO_DIFFER
    assert {"load_split", "reward_and_features", "truncate_after_eos", "require_path"} <= shared  # the test sees them
    assert drifted(definitions) == {}, "copy the reference version into every script (or rename a different concept)"


def test_a_drifted_copy_is_caught():
    """Break one copy (a changed default) and the check names it and the scripts on each side."""
    sources = {s: (ROOT / s).read_text() for s in SCRIPTS}
    sources["sft.py"] = sources["sft.py"].replace(
        "def load_split(dataset: str, split: str, config: Optional[str] = None)",
        "def load_split(dataset: str, split: str, config: Optional[str] = 'default')",
    )
    found = drifted(all_definitions(sources))
    assert list(found) == ["load_split"] and ["sft.py"] in found["load_split"]


@pytest.mark.parametrize("name", sorted(ALLOWED_TO_DIFFER))
def test_the_allow_list_is_not_stale(name):
    assert sum(name in top_level_definitions((ROOT / s).read_text()) for s in SCRIPTS) >= 2

"""The baselines are grpo_signcert.py with the method swapped: write them from it, or check that they are.

grpo_uwo.py, grpo_advpo.py and grpo_bspo.py are copies of grpo_signcert.py that differ from it only inside its
method regions, the lines between a marker `# --- method: <name> ---` and the next `# --- end method ---` (the
docstring, the method's arguments and functions, and the places in `main` where the method enters: its checks,
inputs, models, step 3 and its logged values). Each baseline keeps its own content of every region; everything
outside the regions is grpo_signcert.py's. So an edit outside the method is made once, in grpo_signcert.py:

    python tools/sync_trainers.py            # rewrite the baselines from grpo_signcert.py and their own regions
    python tools/sync_trainers.py --check    # exit 1 and name each baseline that is not (tests/test_trainer_layout.py)

`diff grpo_signcert.py grpo_uwo.py` then shows the method regions and nothing else.
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "grpo_signcert.py"
BASELINES = ("grpo_uwo.py", "grpo_advpo.py", "grpo_bspo.py")
START = re.compile(r"^\s*# --- method: (?P<name>.+?) ---\s*$")
END = re.compile(r"^\s*# --- end method ---\s*$")


def split_regions(text: str, where: str = "") -> list[tuple[str, str]]:
    """The text as consecutive pieces: ("", common text) and (name, a method region's content); the marker lines
    belong to the common text. Errors name the line of an unclosed, nested or stray marker."""
    pieces, common, content, name = [], [], [], None
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if START.match(line):
            if name is not None:
                raise ValueError(f"{where}:{number}: a method region opens inside region {name!r}")
            common.append(line)
            pieces.append(("", "".join(common)))
            common, content, name = [], [], START.match(line)["name"]
        elif END.match(line):
            if name is None:
                raise ValueError(f"{where}:{number}: `# --- end method ---` with no region open")
            pieces.append((name, "".join(content)))
            common, content, name = [line], [], None
        elif name is None:
            common.append(line)
        else:
            content.append(line)
    if name is not None:
        raise ValueError(f"{where}: region {name!r} is never closed")
    pieces.append(("", "".join(common)))
    return pieces


def regions(text: str, where: str = "") -> dict[str, str]:
    """name -> content of every method region (each name once)."""
    out = {}
    for name, content in split_regions(text, where):
        if name and name in out:
            raise ValueError(f"{where}: region {name!r} appears twice")
        if name:
            out[name] = content
    return out


def outside_regions(text: str, where: str = "") -> str:
    """The text with every method region's content removed (the markers kept): what must be the same in all four."""
    return "".join(content for name, content in split_regions(text, where) if not name)


def render(template: str, own: dict[str, str], where: str = "") -> str:
    """The template with each region's content replaced by `own`'s (the same names, in the template's order)."""
    names = [name for name, _ in split_regions(template, TEMPLATE) if name]
    if sorted(names) != sorted(own):
        raise ValueError(
            f"{where} has the regions {sorted(own)}, the template {TEMPLATE} has {sorted(names)}: add or remove "
            "regions so that both have the same names"
        )
    return "".join(own[name] if name else content for name, content in split_regions(template, TEMPLATE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a baseline is out of sync")
    args = parser.parse_args()
    template = (ROOT / TEMPLATE).read_text()
    stale = []
    for baseline in BASELINES:
        path = ROOT / baseline
        text = path.read_text()
        synced = render(template, regions(text, baseline), baseline)
        if synced != text:
            stale.append(baseline)
            if not args.check:
                path.write_text(synced)
    if args.check and stale:
        print(
            f"out of sync with {TEMPLATE} outside their method regions: {', '.join(stale)} "
            "(run `python tools/sync_trainers.py`, then `ruff format`)",
            file=sys.stderr,
        )
        return 1
    print(("rewrote " if stale else "in sync: ") + ", ".join(stale or BASELINES))
    return 0


if __name__ == "__main__":
    sys.exit(main())

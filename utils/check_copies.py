"""Keep the blocks that the training scripts share identical.

Each script is standalone, so a block used by several scripts is copied into each of them. A copy is
marked by a comment on the line above it:

    # Copied from train_mnist.save_ema
    def save_ema(...):

    # Copied from train_mnist.build_unet with unet->transformer
    def build_transformer(...):

The copy must equal the named top-level function or class of the named script, after the optional
`old->new` replacements (applied in order, comma-separated). Run from the repository root:

    python utils/check_copies.py        # exit 1 and list every copy that drifted
    python utils/check_copies.py --fix  # rewrite the copies from their sources
"""

import argparse
import ast
import re
import sys
from pathlib import Path

MARKER = re.compile(r"^# Copied from (\w+)\.(\w+)(?: with (.+))?$")


def blocks(path):
    """Top-level functions and classes of a file: {name: (first line, last line)}, 0-based, inclusive."""
    tree = ast.parse(path.read_text(), filename=str(path))
    spans = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            spans[node.name] = (first, node.end_lineno - 1)
    return spans


def expected_text(root, module, name, renames):
    path = root / f"{module}.py"
    if not path.is_file():
        return None, f"no file {module}.py"
    spans = blocks(path)
    if name not in spans:
        return None, f"no top-level {name} in {module}.py"
    first, last = spans[name]
    text = "\n".join(path.read_text().splitlines()[first : last + 1])
    for pair in renames:
        old, new = pair.split("->")
        text = text.replace(old.strip(), new.strip())
    return text, None


def check_file(root, path, fix):
    """Problems in one file, as lines to print; with fix, the file is rewritten."""
    lines = path.read_text().splitlines()
    problems = []
    # Bottom-up, so that rewriting one block does not move the lines of the blocks above it.
    for name, (first, last) in sorted(blocks(path).items(), key=lambda item: -item[1][0]):
        match = MARKER.match(lines[first - 1].strip()) if first > 0 else None
        if match is None:
            continue
        module, source_name, renames = match.groups()
        renames = [r for r in (renames or "").split(",") if r.strip()]
        want, error = expected_text(root, module, source_name, renames)
        where = f"{path.name}:{first + 1} {name}"
        if error:
            problems.append(f"{where}: {error}")
        elif want != "\n".join(lines[first : last + 1]):
            problems.append(f"{where}: differs from {module}.{source_name}")
            if fix:
                lines[first : last + 1] = want.splitlines()
    if fix and problems:
        path.write_text("\n".join(lines) + "\n")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="Rewrite every drifted copy from its source.")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="Repository root.")
    args = parser.parse_args()
    files = sorted(args.root.glob("*.py"))
    problems = []
    # A source can itself be a copy: repeat the fix until nothing changes.
    for _ in range(5 if args.fix else 1):
        problems = [p for path in files for p in check_file(args.root, path, args.fix)]
        if not args.fix or not problems:
            break
    if args.fix:
        problems = [p for path in files for p in check_file(args.root, path, fix=False)]
    for problem in problems:
        print(problem)
    if problems:
        print("run `python utils/check_copies.py --fix` to rewrite the copies from their sources")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

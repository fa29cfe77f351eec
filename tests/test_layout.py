"""The layout is part of the design (DESIGN.md "Layout"): the top level is the reading path, tools live in
tools/, imports go one way with no cycle (imports inside functions included), and every command the README
and docs/ show runs from its documented place with flags it has."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The reading path, in order (README), then the plumbing. A new top-level file must be placed here.
METHOD = ["lightning_min"]
MODELS = ["unet", "vae", "text", "discriminator", "lora"]
PROGRAMS = ["train", "sample"]
PLUMBING = ["weights", "data", "files", "parallel"]
TOOLS = ["convert", "prepare", "eval", "bench", "toy", "toy_world", "toy_section5", "tiny"]
# who may import whom: the method and models nothing of the project but the method; plumbing the method,
# models and plumbing; programs all of those (not each other); tools anything but tests; nothing imports tests
MAY_IMPORT = {"method": set(), "model": {"method"}, "plumbing": {"method", "model", "plumbing"},
              "program": {"method", "model", "plumbing"}, "tool": {"method", "model", "plumbing", "program", "tool"},
              "test": {"method", "model", "plumbing", "program", "tool", "test"}}


def kind(module):
    if module in METHOD:
        return "method"
    if module in MODELS:
        return "model"
    if module in PLUMBING:
        return "plumbing"
    if module in PROGRAMS:
        return "program"
    if module.startswith("tools.") or module == "tools":
        return "tool"
    if module.startswith("tests.") or module == "tests":
        return "test"
    return None


def project_files():
    files = {p.stem: p for p in ROOT.glob("*.py")}
    files.update({f"tools.{p.stem}": p for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__"})
    files.update({f"tests.{p.stem}": p for p in (ROOT / "tests").glob("*.py") if p.stem != "__init__"})
    return files


def imports_of(path, known):
    """Every project module `path` imports, at any depth (imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in known)
    return found


def test_top_level_is_the_reading_path():
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    assert top == sorted(METHOD + MODELS + PROGRAMS + PLUMBING), "every top-level file has its place in the order"
    assert len(top) <= 12
    assert sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__") == sorted(TOOLS)


def test_imports_go_one_way_with_no_cycle():
    files = project_files()
    graph = {m: imports_of(p, files) - {m} for m, p in files.items()}
    unplaced = sorted(m for m in graph if kind(m) is None)
    assert not unplaced, f"files with no place in the layout: {unplaced}"
    bad = [f"{m} ({kind(m)}) imports {d} ({kind(d)})" for m, deps in graph.items() for d in sorted(deps)
           if kind(d) not in MAY_IMPORT[kind(m)]]
    assert not bad, "\n".join(bad)
    # no cycle anywhere (the rule above allows plumbing -> plumbing and tool -> tool, so check those too)
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} project imports, no cycle")


def test_rule_catches_a_violation(tmp_path):
    """The checker itself: a model importing plumbing, hidden inside a function, is seen."""
    f = tmp_path / "unet.py"
    f.write_text("def f():\n    import weights\n    from files import atomic_write\n")
    deps = imports_of(f, {"weights", "files", "files.atomic_write"})
    assert deps >= {"weights", "files"} and not {"plumbing"} <= MAY_IMPORT[kind("unet")]


# ----------------------------------------------------------------------------------------------------
# Every program and tool, from a clean checkout (only the files git tracks), and the commands of the docs

PROGRAMS_RUN = {"train.py": ["train.py"], "sample.py": ["sample.py"],
                **{f"tools.{t}": ["-m", f"tools.{t}"] for t in TOOLS if t not in ("toy_world", "tiny")}}


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    """--help of each program, run in a copy of the tracked files, so nothing untracked is needed."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    clean = tmp_path_factory.mktemp("checkout")
    for rel in tracked.stdout.splitlines():
        if (ROOT / rel).is_file():
            (clean / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, clean / rel)
    out = {}
    for name, argv in PROGRAMS_RUN.items():
        r = subprocess.run([sys.executable, *argv, "--help"], cwd=clean, capture_output=True, text=True,
                           timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert r.returncode == 0 and "usage:" in r.stdout, f"{name} --help: {r.stderr[-2000:]}"
        out[name] = r.stdout
    return out


def doc_commands():
    """(file, line) of every `python ...` / `torchrun ...` command in a code block of README.md and docs/."""
    cmds = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if re.match(r"(pip install .*&& )?(python|torchrun)\b", line):
                    cmds.append((doc.name, line))
    return cmds


def program_of(line):
    """The program a command line runs, as PROGRAMS_RUN names it, or None (pytest, pip, python -c ...)."""
    m = re.search(r"(?:^|\s)-m (tools\.\w+)", line)
    if m:
        return m.group(1)
    m = re.search(r"(?:^|\s)((?:train|sample)\.py)\b", line)
    return m.group(1) if m else None


def test_every_documented_command_names_a_program_and_flags_it_has(helps):
    cmds = doc_commands()
    assert len(cmds) > 40, "the docs show the commands"
    checked = 0
    for doc, line in cmds:
        if re.search(r"-m (pytest|torch\.distributed)|python -c", line) or "pip install" in line:
            continue
        prog = program_of(line)
        assert prog in helps, f"{doc}: `{line}` runs no program of this project (old path?)"
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line.split(prog, 1)[1]):
            if flag in ("--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--master_port"):
                continue  # torchrun's
            assert re.search(rf"{re.escape(flag)}\b", helps[prog]), f"{doc}: `{line}`: {prog} has no {flag}"
        checked += 1
    print(f"{checked} documented commands checked against --help of {len(helps)} programs")

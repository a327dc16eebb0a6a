"""The docs against the repository: links resolve, commands exist, code runs, figures match.

- every relative link of README.md, docs/*.md and benchmarks/results/*.md names a file of the
  repository, and its ``#anchor`` a heading of that file (GitHub's heading ids); the README
  points nowhere else;
- the README's shell commands name real Makefile targets and ``atman`` flags (parsed by the
  CLI's own parser, nothing run); the ``atman`` commands of docs/*.md too;
- the README's python blocks run, each in a fresh namespace, the model ones on the bundled
  SmolLM2 (marked slow: ``make test`` runs them), and a shape written in a comment
  (``out = ...  # [128, 9, 128, 64]``) is the shape the code gives;
- ``benchmarks/write_tables.py --check``: every generated table equals what its CSV gives.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RESULT_PAGES = sorted((ROOT / "benchmarks" / "results").glob("*.md"))

sys.path.insert(0, str(ROOT / "benchmarks"))
import write_tables  # noqa: E402

FENCE = re.compile(r"^```([\w+-]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def without_code(text: str) -> str:
    """``text`` with fenced blocks blanked (line numbers kept) and inline code removed."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(text):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(without_code(page.read_text()))


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for target in links(page):
        if is_external(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        try:
            dest.relative_to(root)
        except ValueError:
            bad.append(f"{target}: outside the repository")
            continue
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor:
            if dest.suffix != ".md":
                bad.append(f"{target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(root)}")
    return bad


# ------------------------------------------------------------------------------ links

def test_slug_matches_github_ids() -> None:
    assert slug("GPU check (`make gpu-check`)") == "gpu-check-make-gpu-check"
    assert slug("The C++ op against SDPA") == "the-c-op-against-sdpa"
    assert slug("Many examples: `explain_many`") == "many-examples-explain_many"
    assert slug("The paper's numbers") == "the-papers-numbers"


def test_broken_links_are_found(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing anchor, a way out, and good links."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "op.md").write_text("# The op\n\n## Backends\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Title\n\n[a](op.md) [b](nowhere.md) [c](op.md#no-such-heading) "
                    "[d](#title) [e](#missing) `[f](inline-code.md)` [g](op.md#backends) "
                    "[h](../../outside.md) ![i](op.md)\n\n```\n[j](in-a-block.md)\n```\n")
    assert broken_links(page, root=tmp_path) == [
        "nowhere.md: no such file",
        "op.md#no-such-heading: no heading #no-such-heading in docs/op.md",
        "#missing: no heading #missing in docs/page.md",
        "../../outside.md: outside the repository",
    ]


@pytest.mark.parametrize("page", PAGES + RESULT_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_points_only_inside_the_repository() -> None:
    outside = [t for t in links(README) if is_external(t)]
    assert outside == [], f"README links outside the repository: {outside}"
    assert not re.search(r"https?://", without_code(README.read_text())), "a bare URL"


def test_readme_length() -> None:
    assert len(README.read_text().splitlines()) <= 250


# ------------------------------------------------------------------------------ shell commands

def fenced(page: Path, *languages: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(page.read_text()) if m.group(1) in languages]


def commands(block: str, prompt_only: bool) -> list[list[str]]:
    """The commands of a shell block as argv lists (``$ `` lines only when ``prompt_only``;
    a backslash or an open quote continues a command on the next line)."""
    out: list[list[str]] = []
    pending = ""
    for line in block.splitlines():
        if not pending:
            if prompt_only:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        pending += line + "\n"
        if pending.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        pending = ""
        if argv:
            out.append(argv)
    assert not pending, f"unfinished command: {pending!r}"
    return out


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))


def atman_parser() -> argparse.ArgumentParser:
    from atman_kernels.cli.args import build_parser

    return build_parser()


def check_command(argv: list[str]) -> str | None:
    """Why ``argv`` does not name something that exists, or None."""
    prog = argv[0]
    if prog == "make":
        missing = [t for t in argv[1:] if "=" not in t and t not in make_targets()]
        return f"no Makefile target {missing}" if missing else None
    if prog in ("atman", ".venv/bin/atman"):
        parser = atman_parser()
        known = set(parser._option_string_actions)  # argparse would take abbreviations
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    known |= set(sub._option_string_actions)
        unknown = [a.split("=")[0] for a in argv[1:]
                   if a.startswith("--") and a.split("=")[0] not in known]
        if unknown:
            return f"no atman flag {unknown}"
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:  # --help exits 0
            return None if exc.code == 0 else f"atman refuses {argv[1:]} (exit {exc.code})"
        return None
    if prog in ("python", "python3", ".venv/bin/python"):
        script = argv[1]
        return None if (ROOT / script).is_file() else f"no script {script}"
    return f"unknown command {prog!r}"


def test_command_checker_fails_on_a_wrong_command(capsys: pytest.CaptureFixture) -> None:
    assert check_command(["make", "explain"]) is None
    assert check_command(["make", "no-such-target"]) is not None
    assert check_command(["atman", "explain", "--prompt", "x", "--no-such-flag"]) is not None
    assert check_command(["atman", "explain", "--prompt", "x", "--spans", "1:3"]) is None
    assert check_command(["atman", "explain", "--prompt", "x", "--htm", "a.html"]) is not None
    assert check_command(["python", "benchmarks/no_such_script.py"]) is not None
    capsys.readouterr()


def test_readme_shell_commands_exist(capsys: pytest.CaptureFixture) -> None:
    found = [argv for block in fenced(README, "bash", "sh", "shell")
             for argv in commands(block, prompt_only=False)]
    found += [argv for block in fenced(README, "", "console")
              for argv in commands(block, prompt_only=True)]
    inline = re.findall(r"`((?:make|atman|\.venv/bin/atman) [^`]*)`", README.read_text())
    found += [shlex.split(c) for c in inline]
    assert {"make explain", "make test"} <= {" ".join(a[:2]) for a in found}
    problems = [f"{' '.join(a)}: {why}" for a in found if (why := check_command(a))]
    capsys.readouterr()
    assert problems == []


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_atman_and_make_commands_exist(page: Path, capsys: pytest.CaptureFixture) -> None:
    found = [argv for block in fenced(page, "bash", "sh", "shell")
             for argv in commands(block, prompt_only=False)]
    found += [argv for block in fenced(page, "", "console") if block.lstrip().startswith("$")
              for argv in commands(block, prompt_only=True)]
    found = [a for a in found if a[0] in ("atman", ".venv/bin/atman", "make")]
    found += [shlex.split(c) for c in re.findall(r"`(make [a-z][\w-]*)`", page.read_text())]
    problems = [f"{' '.join(a)}: {why}" for a in found if (why := check_command(a))]
    capsys.readouterr()
    assert problems == []


# ------------------------------------------------------------------------------ python blocks

PYTHON_BLOCKS = fenced(README, "python")
SHAPE = re.compile(r"^(\w+)(?:\s*,\s*\w+)*\s*=.*#\s*\[(\d+(?:\s*,\s*\d+)*)\]\s*$", re.M)
PRINTED = re.compile(r"^\s*print\(.*#\s*->\s*(.+?)\s*$", re.M)


def run_block(code: str) -> dict:
    """Run ``code``; the shapes (``# [2, 3]``) and printed lines (``# -> text``) its comments
    state must be what it gives."""
    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    for name, dims in SHAPE.findall(code):
        want = tuple(int(d) for d in dims.split(","))
        assert tuple(namespace[name].shape) == want, f"{name}: {tuple(namespace[name].shape)}"
    printed = out.getvalue().splitlines()
    for want in PRINTED.findall(code):
        assert want in printed, f"printed {printed}, not {want!r}"
    return namespace


def test_shape_and_output_comments_are_checked() -> None:
    with pytest.raises(AssertionError, match="x: "):
        run_block("import torch\nx = torch.zeros(2, 3)   # [3, 2]\n")
    run_block("import torch\nx = torch.zeros(2, 3)   # [2, 3]\n")
    with pytest.raises(AssertionError, match="not 'b'"):
        run_block("print('a')   # -> b\n")
    run_block("print('a b')   # -> a b\n")


def test_readme_has_the_three_blocks() -> None:
    joined = "\n".join(PYTHON_BLOCKS)
    for name in ("suppressed_attention(", "atman_attention(", "MultiheadAttention(",
                 "AtManExplainer("):
        assert name in joined


@pytest.mark.parametrize("index", [
    pytest.param(i, marks=[pytest.mark.slow] if "load_smollm2" in code else [])
    for i, code in enumerate(PYTHON_BLOCKS)])
def test_readme_python_block_runs(index: int, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks write their HTML / PNG here
    run_block(PYTHON_BLOCKS[index])


# ------------------------------------------------------------------------------ generated figures

def test_generated_tables_match_their_csvs(capsys: pytest.CaptureFixture) -> None:
    code = write_tables.main(["--check"])
    err = capsys.readouterr().err
    assert code == 0, err


def test_check_fails_on_a_changed_figure(tmp_path: Path) -> None:
    text = README.read_text()
    assert "<!-- table:headline -->" in text
    head, rest = text.split("<!-- table:headline -->", 1)
    body, tail = rest.split("<!-- /table -->", 1)
    changed = re.sub(r"\d\.\d\d", "9.99", body, count=1)
    assert changed != body
    page = tmp_path / "README.md"
    page.write_text(head + "<!-- table:headline -->" + changed + "<!-- /table -->" + tail)
    assert write_tables.stale_blocks(page) == ["headline"]
    page.write_text(text)
    assert write_tables.stale_blocks(page) == []


def test_every_generator_is_used_and_every_marker_known() -> None:
    used = set()
    for page in write_tables.pages():
        used |= set(write_tables.BEGIN.findall(page.read_text()))
    assert used == set(write_tables.BLOCKS)
    with pytest.raises(ValueError, match="unknown block"):
        write_tables.render("<!-- table:no_such_block -->\n<!-- /table -->\n")
    with pytest.raises(ValueError, match="has no"):
        write_tables.render("<!-- table:headline -->\nno end\n")

"""explain_many with two writers: one OS lock per output file, held for the whole run.

Two processes started together on one output: one is refused at start with a one-line error
naming the file (and explains nothing), the other writes every example exactly once. A run
killed while holding the lock releases it (the OS does), and the next run resumes. The explainer
in the processes is a stand-in (``explain`` records its calls and can wait at a gate), so the
order of events is set by the test, not by timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atman_kernels.explain.many import (
    ExampleError,
    OutputLocked,
    check_output_unlocked,
    explain_many,
    output_lock,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

ROOT = Path(__file__).resolve().parent.parent
REFUSED = 3  # the worker's exit status when explain_many refuses the output

WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from atman_kernels.explain.many import OutputLocked, explain_many

    out, log, gate, wait_at, n = sys.argv[1:6]

    class Expl:
        def __init__(self, prompt):
            self.prompt = prompt

        def to_dict(self):
            return {"prompt": self.prompt}

    class Explainer:
        progress = False

        def explain(self, inputs, target=None, **kwargs):
            with open(log, "a") as fh:
                fh.write(f"{os.getpid()} {inputs}\\n")
            if inputs == wait_at:  # hold here (and the lock) until the test opens the gate
                Path(gate + ".waiting").write_text(str(os.getpid()))
                while not Path(gate).exists():
                    time.sleep(0.01)
            return Expl(inputs)

    examples = [{"id": f"ex{i}", "prompt": f"p{i}"} for i in range(int(n))]
    try:
        explain_many(Explainer(), examples, output=out)
    except OutputLocked as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
""")


def _start(tmp_path: Path, out: Path, wait_at: str = "-", n: int = 4) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(tmp_path / "calls.log"),
         str(tmp_path / "gate"), wait_at, str(n)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(condition, what: str, procs=(), timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        dead = [p for p in procs if p.poll() not in (None, REFUSED)]
        if dead:
            raise AssertionError(f"a worker ended with {dead[0].returncode} while waiting for "
                                 f"{what}: {dead[0].stderr.read()}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in out.read_text().splitlines()]


def _calls(tmp_path: Path) -> list[tuple[int, str]]:
    log = tmp_path / "calls.log"
    if not log.exists():
        return []
    return [(int(pid), prompt) for pid, prompt in
            (line.split() for line in log.read_text().splitlines())]


def test_two_processes_on_one_output_one_is_refused_the_other_writes_each_once(tmp_path):
    out = tmp_path / "out.jsonl"
    # both start together; whichever locks first waits at the gate in its first example,
    # holding the lock, until the other has given up
    procs = [_start(tmp_path, out, wait_at="p0"), _start(tmp_path, out, wait_at="p0")]
    try:
        _wait_for(lambda: any(p.poll() == REFUSED for p in procs)
                  or len({pid for pid, _ in _calls(tmp_path)}) > 1,  # both got in: no lock
                  "a refused worker", procs)
        (tmp_path / "gate").touch()
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, REFUSED], [p.stderr.read() for p in procs]
    loser = next(p for p in procs if p.returncode == REFUSED)
    winner = next(p for p in procs if p.returncode == 0)
    message = loser.stderr.read().strip()
    assert "\n" not in message and str(out) in message and "another explain_many run" in message
    assert _ids(out) == ["ex0", "ex1", "ex2", "ex3"]  # each example once, in order
    calls = _calls(tmp_path)
    assert [prompt for _, prompt in calls] == ["p0", "p1", "p2", "p3"]
    assert {pid for pid, _ in calls} == {winner.pid}  # the refused one explained nothing


def test_a_killed_run_releases_the_lock_and_the_next_run_resumes(tmp_path):
    out = tmp_path / "out.jsonl"
    first = _start(tmp_path, out, wait_at="p2")  # writes ex0, ex1, then holds at p2
    try:
        _wait_for(lambda: (tmp_path / "gate.waiting").exists(), "the first run at p2", [first])
        with pytest.raises(OutputLocked, match="another explain_many run"):
            check_output_unlocked(out)  # held by the running process
        second = _start(tmp_path, out)
        assert second.wait(timeout=120) == REFUSED, second.stderr.read()
        assert _ids(out) == ["ex0", "ex1"]
        os.kill(first.pid, signal.SIGKILL)  # a crash: no cleanup runs in the process
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    check_output_unlocked(out)  # the OS released it
    third = _start(tmp_path, out)
    assert third.wait(timeout=120) == 0, third.stderr.read()
    assert _ids(out) == ["ex0", "ex1", "ex2", "ex3"]
    # the resumed run explained only what the killed one had not written
    assert [prompt for pid, prompt in _calls(tmp_path) if pid == third.pid] == ["p2", "p3"]


class _Expl:
    def __init__(self, prompt):
        self.prompt = prompt

    def to_dict(self):
        return {"prompt": self.prompt}


class _Explainer:
    progress = False

    def __init__(self):
        self.calls = []

    def explain(self, inputs, target=None, **kwargs):
        self.calls.append(inputs)
        if inputs == "bad":
            raise ValueError("refused example")
        return _Expl(inputs)


EXAMPLES = [{"id": f"ex{i}", "prompt": f"p{i}"} for i in range(3)]


def test_a_held_output_is_refused_in_the_same_process_before_any_example(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "ex0", "explanation": {}}\n')
    before = out.read_bytes()
    explainer = _Explainer()
    with output_lock(out) as created:
        assert not created
        with pytest.raises(OutputLocked) as err:
            explain_many(explainer, EXAMPLES, output=out)
        with pytest.raises(OutputLocked):  # resume=False: the lock is named, not "exists"
            explain_many(explainer, EXAMPLES, output=out, resume=False)
    assert err.value.path == out and str(out) in str(err.value)
    assert explainer.calls == [] and out.read_bytes() == before
    assert [i for i, _ in explain_many(explainer, EXAMPLES, output=out)] == ["ex1", "ex2"]
    assert _ids(out) == ["ex0", "ex1", "ex2"]


def test_the_lock_is_released_after_an_error_and_an_empty_new_output_is_removed(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    explainer = _Explainer()
    with pytest.raises(ExampleError):
        explain_many(explainer, [{"id": "x", "prompt": "bad"}], output=out)
    assert not out.exists()  # created for the lock, nothing written: removed again
    with pytest.raises(ExampleError):
        explain_many(explainer, [EXAMPLES[0], {"id": "x", "prompt": "bad"}], output=out)
    assert _ids(out) == ["ex0"]  # kept: it holds a line
    with output_lock(out):  # free again
        pass
    with pytest.raises(FileExistsError, match="exists"):
        explain_many(explainer, EXAMPLES, output=out, resume=False)
    assert _ids(out) == ["ex0"]


def test_the_cli_refuses_a_held_output_before_loading_the_model(tmp_path, capsys):
    from atman_kernels.cli import main

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "the capital", "target": "paris"}) + "\n")
    out = tmp_path / "out.jsonl"
    missing_model = tmp_path / "no-such-model"  # loading it would be another error
    argv = ["explain", "--model", str(missing_model), "--input", str(data), "--output", str(out)]
    with output_lock(out), pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"atman: error: --output {out} is being "
                                                   "written by another explain_many run")
    assert not out.exists()  # the lock's empty file is gone with the lock
    with pytest.raises(SystemExit):  # unheld: the CLI goes on to the model, and fails there
        main(argv)
    assert "is being written" not in capsys.readouterr().err

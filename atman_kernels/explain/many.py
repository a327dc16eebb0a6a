"""Explain many examples: one progress bar, results streamed to JSON Lines, resumable.

Each finished example is appended to ``output`` as one line, ``{"id": ..., "explanation":
Explanation.to_dict()}``, flushed and synced to disk before the next starts: a crash loses at
most the example in flight, and a rerun with the same ``output`` skips every id already there
(a line cut short by the crash is dropped first).

One writer per output: the run holds an exclusive OS lock (``flock``) on ``output`` from its
start to its end, and a second run on the same file, in this or another process, is refused
at once with :class:`OutputLocked` naming the file. The OS releases the lock when the holder
exits, also by a crash or a kill, so the next run resumes. (POSIX only: where ``fcntl`` is
missing, Windows, no lock is taken.)

This is a loop over :meth:`AtManExplainer.explain`, one example after another: each example's
variants are batched as in a single call, but different examples share no forward (they share
nothing to reuse). What it adds is the single progress bar, the streamed output and the resume;
``benchmarks/bench_many.py`` measures its overhead against a plain loop.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from .distributed import Group, check_parts, merge, part_path, place_from_env, share
from .explanation import Explanation, ensure_parent

try:
    import fcntl
except ImportError:  # Windows: no flock, no lock
    fcntl = None


class Explains(Protocol):
    """What :func:`explain_many` needs of an explainer (:class:`AtManExplainer` is one; a
    Protocol, so that this module imports nothing above it)."""

    progress: bool

    def explain(self, inputs: Any, target: Any = None, **kwargs: Any) -> Explanation: ...


# per-example keys an example dict may carry (the rest of explain()'s arguments come from the
# call, the same for every example)
EXAMPLE_KEYS = ("id", "prompt", "inputs", "target", "contrast", "spans", "context")


class ExampleError(ValueError):
    """An example that :meth:`AtManExplainer.explain` refused: ``ident`` is its id, ``cause``
    the original error; the examples before it are already in the output."""

    def __init__(self, ident: str, cause: Exception):
        super().__init__(f"example {ident!r}: {cause}")
        self.ident, self.cause = ident, cause


class OutputLocked(RuntimeError):
    """Another :func:`explain_many` run holds the lock on the output file ``path``."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is being written by another explain_many run (it holds the "
                         "file's lock): wait for that run to end, then run again to resume, or "
                         "choose another output file")
        self.path = path


def _lock_or_refuse(fd: int, path: Path, kind: int) -> None:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputLocked(path) from None


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block, or raise
    :class:`OutputLocked` at once if another open file holds one; yields whether this call
    created the file. A file it created and left empty is removed again on exit (nothing is
    left behind by a run that wrote nothing)."""
    if fcntl is None:
        yield not path.exists()
        return
    for _ in range(100):  # another run removed the (empty) file between our open and lock
        try:
            fd, created = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL,
                                  0o666), True
        except FileExistsError:
            fd, created = os.open(path, os.O_WRONLY | os.O_APPEND), False
        try:
            _lock_or_refuse(fd, path, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            break
        os.close(fd)  # we locked a file no longer at ``path``: lock the one that is
    else:
        raise RuntimeError(f"{path} kept being removed or replaced while it was being locked")
    try:
        yield created
    finally:
        try:
            if created and _same_empty_file(fd, path):
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock


def _same_empty_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` and that file is empty (a file put in
    its place, e.g. a merged output renamed over it, is never removed)."""
    held = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino) and held.st_size == 0


def check_output_unlocked(path: Path) -> None:
    """Raise :class:`OutputLocked` if an :func:`explain_many` run holds ``path`` now (a check
    before slow work, e.g. loading the model; the run itself takes the lock)."""
    if fcntl is None or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _lock_or_refuse(fd, path, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _examples(examples: Iterable[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, explain() arguments) of each example: a dict with "prompt" (or "inputs") and
    optionally "id", "target", "contrast", "spans", "context" (a document given apart from the
    question in "prompt": ``explain(context=...)``); or a (prompt, target) pair."""
    for index, item in enumerate(examples):
        if isinstance(item, dict):
            unknown = set(item) - set(EXAMPLE_KEYS)
            if unknown:
                raise ValueError(f"example {index}: unknown keys {sorted(unknown)} (an example "
                                 f"holds {', '.join(EXAMPLE_KEYS)})")
            if ("prompt" in item) == ("inputs" in item):
                raise ValueError(f"example {index}: give its input as 'prompt' (or 'inputs')")
            args = {"inputs": item.get("prompt", item.get("inputs")),
                    "target": item.get("target")}
            for key in ("contrast", "spans", "context"):
                if item.get(key) is not None:
                    args[key] = item[key]
            ident = item.get("id", index)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            args, ident = {"inputs": item[0], "target": item[1]}, index
        else:
            raise TypeError(f"example {index} must be a dict with 'prompt' and 'target' or a "
                            f"(prompt, target) pair, got {type(item).__name__}")
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise TypeError(f"example {index}: id must be a str or int, got {ident!r}")
        yield str(ident), args


def finished_ids(path: Path, repair: bool = True) -> set[str]:
    """Ids already in a JSON Lines output; a last line cut short (a crash mid-write) is
    removed from the file (``repair=False``: left there, only checked)."""
    if not path.exists():
        return set()
    done: set[str] = set()
    keep = 0
    with open(path, "rb") as fh:
        data = fh.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):  # the last line, cut short (each record ends in \n)
            break
        try:
            record = json.loads(line)
            ident = record["id"]
            if not isinstance(record["explanation"], dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} line {len(done) + 1} is not an explain_many record "
                             '({"id": ..., "explanation": ...})') from None
        done.add(str(ident))
        keep += len(line)
    if keep < len(data) and repair:
        with open(path, "r+b") as fh:
            fh.truncate(keep)
    return done


def explain_many(explainer: Explains, examples: Iterable[Any], *,
                 output: str | Path | None = None, resume: bool = True,
                 progress: bool | None = None, **explain_kwargs: Any
                 ) -> list[tuple[str, Explanation]]:
    """Explain every example; see :meth:`AtManExplainer.explain_many`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process explains its share of the examples
    into a part file and rank 0 merges the parts into ``output`` in input order
    (:mod:`.distributed`); without ``output`` each process returns its share's explanations.

    Raises:
        OutputLocked: another run holds ``output`` (before any example is explained).
        FileExistsError: ``output`` exists and ``resume`` is False.
        ValueError: part files this run cannot continue (another world size; or a single
            process finding a distributed run's parts).
    """
    path = None if output is None else Path(output)
    place = place_from_env()
    if place.distributed:
        return _explain_share(explainer, examples, path, place, resume, progress,
                              explain_kwargs)
    items = _examples(examples)
    total = len(examples) if hasattr(examples, "__len__") else None
    if path is None:
        return _explain_all(explainer, items, total, None, set(), progress, explain_kwargs)
    ensure_parent(path)
    check_parts(path, place)
    with output_lock(path) as created:
        if not created and not resume:
            raise FileExistsError(f"output {path} exists: pass resume=True to skip the examples "
                                  "it holds, or choose another file")
        done = finished_ids(path)  # read under the lock: a finished run's lines are all there
        return _explain_all(explainer, items, total, path, done, progress, explain_kwargs)


def _explain_share(explainer: Explains, examples: Iterable[Any], path: Path | None,
                   place: Any, resume: bool, progress: bool | None,
                   explain_kwargs: dict[str, Any]) -> list[tuple[str, Explanation]]:
    """One rank of a distributed run: its share into its part, then rank 0 merges."""
    items = list(_examples(examples))
    ids = [ident for ident, _ in items]
    seen: set[str] = set()
    for ident in ids:  # every rank checks the whole input, so all refuse alike
        if ident in seen:
            raise ValueError(f"example id {ident!r} appears twice")
        seen.add(ident)
    mine = [items[i] for i in share(len(items), place)]
    if path is None:
        return _explain_all(explainer, iter(mine), len(mine), None, set(), progress,
                            explain_kwargs)
    ensure_parent(path)
    check_parts(path, place)
    part = part_path(path, place)
    if not resume and (path.exists() or part.exists()):
        raise FileExistsError(f"output {path if path.exists() else part} exists: pass "
                              "resume=True to skip the examples it holds, or choose another file")
    merged = finished_ids(path, repair=False)  # lines a finished earlier run already holds
    model = getattr(explainer, "model", None)
    device = next(model.parameters()).device if model is not None else None
    with Group(place, device) as group:
        with output_lock(part):
            done = finished_ids(part) | merged
            results = _explain_all(explainer, iter(mine), len(mine), part, done, progress,
                                   explain_kwargs)
        group.barrier()  # every part is complete before rank 0 reads them
        if place.rank == 0:
            merge(path, ids, place, lock=output_lock)
        group.barrier()  # no rank returns before the merged output is there
    return results


def _explain_all(explainer: Explains, items: Iterator[tuple[str, dict[str, Any]]],
                 total: int | None, path: Path | None, done: set[str], progress: bool | None,
                 explain_kwargs: dict[str, Any]) -> list[tuple[str, Explanation]]:
    """The loop of :func:`explain_many`: (id, explain() arguments) ``items`` (from
    :func:`_examples`); the ids in ``done`` skipped, each other example explained and
    appended to ``path`` (when given)."""
    from tqdm.auto import tqdm

    show = explainer.progress if progress is None else bool(progress)
    results: list[tuple[str, Explanation]] = []
    seen: set[str] = set()
    inner = explainer.progress
    explainer.progress = False  # one bar for the whole run
    try:
        with tqdm(total=total, desc="AtMan examples", unit="example", disable=not show) as bar:
            for ident, args in items:
                if ident in seen:
                    raise ValueError(f"example id {ident!r} appears twice")
                seen.add(ident)
                if ident in done:
                    bar.update(1)
                    continue
                try:
                    expl = explainer.explain(args.pop("inputs"), args.pop("target"),
                                             **args, **explain_kwargs)
                except (ValueError, NotImplementedError) as exc:
                    raise ExampleError(ident, exc) from exc
                if path is not None:
                    line = json.dumps({"id": ident, "explanation": expl.to_dict()},
                                      ensure_ascii=False, allow_nan=False)
                    with open(path, "a", encoding="utf-8") as fh:
                        fh.write(line + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                results.append((ident, expl))
                bar.update(1)
    finally:
        explainer.progress = inner
    return results


def read_many(path: str | Path) -> Iterator[tuple[str, Explanation]]:
    """(id, Explanation) of every record of an :func:`explain_many` output."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                yield str(record["id"]), Explanation.from_dict(record["explanation"])

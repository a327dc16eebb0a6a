"""One data set over several processes (``torchrun``): shares, part files and the merge.

:func:`atman_kernels.explain.many.explain_many` (and ``atman explain --input/--output``) runs
under ``torchrun`` unchanged. Each process (rank) reads its place from the environment
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; one process when they are absent):

- **its share**: the examples whose position in the input is ``rank`` modulo ``world``
  (:func:`share`), a split that depends only on the input, so a restarted rank takes the same
  examples again;
- **its part**: it appends its explanations, in the output's line format, to
  ``OUTPUT.part-<rank>-of-<world>`` next to the output (:func:`part_path`), under the same OS
  lock and with the same resume as a single run: a rank restarted after a crash skips the ids
  its part holds;
- **the merge**: when every rank has finished (a barrier of ``torch.distributed``, gloo on
  CPU, nccl when the model is on CUDA; the group is made only when there is none and
  ``WORLD_SIZE`` > 1), rank 0 writes one output holding the lines already in it, then every
  part's lines, in input order, to a temporary file renamed over the output (atomic), and
  removes the parts (:func:`merge`). An id missing from every file, or found twice, stops
  the merge with the files named; nothing is removed then.

Refused before any work, naming the files: parts left by a run with another world size (a
different split: finish that run with its world size, or remove them), and parts found by a
single-process run (it would explain their examples again).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PART = re.compile(r"\.part-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Place:
    """This process's rank, the number of processes, its rank on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def place_from_env(env: dict[str, str] | None = None) -> Place:
    """The :class:`Place` torchrun's variables give (one process when RANK / WORLD_SIZE are
    absent); malformed values are refused naming the variable."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return Place()

    def number(name: str, default: str | None = None) -> int:
        value = env.get(name, default)
        if value is None:
            raise ValueError(f"{name} is not set while RANK / WORLD_SIZE are: run under torchrun "
                             "(or set RANK, WORLD_SIZE and LOCAL_RANK)")
        try:
            out = int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if out < 0:
            raise ValueError(f"{name} must be >= 0, got {out}")
        return out

    world, rank = number("WORLD_SIZE"), number("RANK")
    if world < 1 or rank >= world:
        raise ValueError(f"RANK must be in 0..WORLD_SIZE-1, got RANK={rank}, WORLD_SIZE={world}")
    return Place(rank, world, number("LOCAL_RANK", "0"))


def share(n: int, place: Place) -> list[int]:
    """Positions of the examples this rank explains: ``rank, rank + world, ...`` below n."""
    return list(range(place.rank, n, place.world))


def part_path(output: Path, place: Place) -> Path:
    """The file rank ``place.rank`` of ``place.world`` appends to."""
    return output.with_name(f"{output.name}.part-{place.rank}-of-{place.world}")


def parts_of(output: Path) -> list[tuple[Path, int, int]]:
    """(path, rank, world) of every part file of ``output`` on disk."""
    found = []
    if output.parent.is_dir():
        for p in sorted(output.parent.glob(f"{output.name}.part-*-of-*")):
            m = PART.search(p.name)
            if m and p.name == f"{output.name}.part-{m.group(1)}-of-{m.group(2)}":
                found.append((p, int(m.group(1)), int(m.group(2))))
    return found


def check_parts(output: Path, place: Place) -> None:
    """Refuse parts of ``output`` this run cannot continue (module docstring)."""
    parts = parts_of(output)
    other = [p for p, _, world in parts if world != place.world]
    if other and place.distributed:
        raise ValueError(
            f"{', '.join(map(str, other))} were written by a run with another number of "
            f"processes than this one's {place.world} (each number splits the input "
            f"differently): finish that run with its WORLD_SIZE, or remove those files")
    if parts and not place.distributed:
        raise ValueError(
            f"{', '.join(str(p) for p, _, _ in parts)} hold the work of an unfinished run over "
            f"several processes: finish it under torchrun with the same number of processes "
            f"(it resumes and merges), or remove those files")


def _records(path: Path) -> list[tuple[str, str]]:
    """(id, line) of every complete line of an output or part file."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n") and line.strip():
                out.append((str(json.loads(line)["id"]), line))
    return out


def merge(output: Path, ids: Sequence[str], place: Place,
          lock: Callable[[Path], Any] = lambda path: contextlib.nullcontext()) -> int:
    """Rank 0: the output's own lines and every part's, in the order of ``ids``, written to
    ``output`` atomically (under ``lock(output)``: explain_many passes its OS file lock); the
    parts removed. Returns the number of lines written."""
    sources = [output] + [part_path(output, Place(r, place.world)) for r in range(place.world)]
    by_id: dict[str, tuple[str, Path]] = {}
    for path in sources:
        for ident, line in _records(path):
            if ident in by_id and by_id[ident][1] != path:
                raise RuntimeError(f"id {ident!r} is in both {by_id[ident][1]} and {path}: "
                                   "nothing was merged")
            by_id[ident] = (line, path)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RuntimeError(f"{len(missing)} example(s) are in no part of {output} (first: "
                           f"{missing[0]!r}); rerun to resume them: nothing was merged")
    tmp = output.with_name(f"{output.name}.merging")
    with lock(output):
        with open(tmp, "w", encoding="utf-8") as fh:
            for ident in ids:
                fh.write(by_id[ident][0])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, output)
    for path in sources[1:]:
        path.unlink(missing_ok=True)
    return len(ids)


class Group:
    """The process group for the barrier before the merge: the one already made, or one made
    here (gloo, or nccl for a model on CUDA) and destroyed on exit."""

    def __init__(self, place: Place, device: Any = None) -> None:
        self.place, self.device, self.made = place, device, False

    def __enter__(self) -> Group:
        if not self.place.distributed:
            return self
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = getattr(self.device, "type", None) == "cuda"
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            self.made = True
        return self

    def barrier(self) -> None:
        if self.place.distributed:
            import torch.distributed as dist

            dist.barrier()

    def __exit__(self, *exc: object) -> None:
        if self.made:
            import torch.distributed as dist

            dist.destroy_process_group()

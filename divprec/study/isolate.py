"""Run one stage of a study in a fresh process, so megatron's global state never leaks between
stages (every pre-training, evaluation and RL probe builds its own process group and model).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A stage's process failed; the message ends with the tail of its output."""


# A stage is a world of one: it must not join the rendezvous of the process that started it
# (whose MASTER_PORT may still be held, e.g. by a test's process group).
_RENDEZVOUS_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
)


def _stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    return {**env, **(extra or {})}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def run_command(
    argv: Sequence[str],
    log_path: Path,
    *,
    poll: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
    interval_s: float = 2.0,
) -> None:
    """Run ``argv`` with stdout and stderr going to ``log_path``; call ``poll`` every
    ``interval_s`` while it runs. Raises :class:`StageError` on a non-zero exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=_stage_env(env)
        )
        try:
            while proc.poll() is None:
                time.sleep(interval_s)
                if poll is not None:
                    poll()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if proc.returncode != 0:
        raise StageError(
            f"{' '.join(argv[:4])} ... exited with {proc.returncode} (log: {log_path}):\n"
            + _tail(log_path)
        )


def _child(fn: Callable[..., Any], args: tuple, result_path: str, log_path: str) -> None:
    for name in _RENDEZVOUS_VARS:  # spawned children inherit the parent's environment
        os.environ.pop(name, None)
    # Everything this process prints goes to the stage's log, not over the study's progress bar.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        out = fn(*args)
        tmp = Path(result_path + ".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=_jsonable) + "\n")
        tmp.replace(result_path)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_function(
    fn: Callable[..., Any],
    args: tuple,
    result_path: Path,
    log_path: Path,
    *,
    poll: Callable[[], None] | None = None,
    interval_s: float = 2.0,
) -> Any:
    """``fn(*args)`` in a freshly spawned process; its JSON-able return value is written to
    ``result_path`` (atomically) and returned. ``fn`` must be a module-level function."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_child, args=(fn, args, str(result_path), str(log_path)))
    proc.start()
    try:
        while proc.is_alive():
            proc.join(timeout=interval_s)
            if poll is not None:
                poll()
    except BaseException:
        proc.terminate()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        raise
    if proc.exitcode != 0 or not result_path.is_file():
        raise StageError(
            f"{fn.__module__}.{fn.__name__} exited with {proc.exitcode} (log: {log_path}):\n"
            + _tail(log_path)
        )
    return json.loads(result_path.read_text())

"""Input errors and atomic output: every CLI reports bad input as one line and exit status 2.

Outputs: a CLI checks every output path with `check_output_path` before any long work (the folder
must exist: a mistyped one is an error, not created), then writes them all with `atomic_paths`
(all or none). Written files get the usual mode (0666 minus the umask), not mkstemp's 0600.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


class InputError(Exception):
    """Bad user input (a file or an argument); `str()` is the one line the CLI prints."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def exit_on_input_error(main):
    """Decorator for CLI `main` functions: InputError → one line on stderr, exit status 2."""

    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    wrapper.__name__ = main.__name__
    wrapper.__doc__ = main.__doc__
    return wrapper


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, option: str) -> Path:
    """InputError unless `path` can be written: its folder exists and is writable, and it is not a folder."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(path, f"{option}: is a folder, not a file")
    if not parent.is_dir():
        raise InputError(path, f"{option}: folder {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(path, f"{option}: folder {str(parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(path, f"{option}: file exists and is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The folder is created if missing (library callers); CLIs check their paths first.
    """
    with atomic_paths([path], make_parents=True) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], *, make_parents: bool = False) -> Iterator[list[Path]]:
    """Temporary paths beside each of `paths`; all are renamed into place only if the block succeeds."""
    finals = [Path(p) for p in paths]
    tmps: list[Path] = []
    mode = 0o666 & ~_umask()
    try:
        for path in finals:
            if make_parents:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        for tmp in tmps:
            if tmp.exists():
                os.chmod(tmp, mode)
        for tmp, path in zip(tmps, finals):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_default(o):
    """`json.dumps(default=...)` for numpy scalars and arrays."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)

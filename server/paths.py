"""Keep client-given paths inside the configured roots: `..` and symlinks are resolved before the check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from server.errors import FieldError

if TYPE_CHECKING:
    from server.settings import Settings


def confine(path: str, *, roots: list[Path], base: Path) -> Path:
    """The resolved path if it lies under one of `roots` (relative paths are taken from `base`).

    Raises ValueError otherwise. Symlinks are followed first, so a link inside a root that points
    outside it is refused.
    """
    try:
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = base / candidate
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop...
        raise ValueError(f"{path!r}: {e}") from None
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise ValueError(f"{path!r} is outside the allowed roots ({', '.join(str(r) for r in roots)}; an operator adds "
                     "more with PARATRAIN_EXTRA_ROOTS)")


def confine_field(value: str, loc: tuple[str, ...], settings: Settings) -> Path:
    """confine() of a request field to the server's read roots: outside them, a 422 naming the field."""
    assert settings.data_root is not None
    try:
        return confine(value, roots=settings.read_roots, base=settings.data_root)
    except ValueError as e:
        raise FieldError(loc, str(e)) from None


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def confine_data_file(value: str, loc: tuple[str, ...], settings: Settings) -> Path:
    """confine_field() of a dataset path that must be a file: a directory or a missing file is the request's
    mistake, a 422 naming the field (the file's lines are checked by whoever reads it)."""
    path = confine_field(value, loc, settings)
    if is_dir(path):
        raise FieldError(loc, f"{value!r} is a directory: give its JSONL file")
    if not is_file(path):
        raise FieldError(loc, f"{value!r}: no such file (looked for {path}; relative paths start at the data root "
                              f"{settings.data_root})")
    return path


def safe_child(root: Path, relative: str) -> Path:
    """`root/relative`, refusing anything that resolves outside `root` (artifact downloads)."""
    try:
        target = (root / relative).resolve()
    except RuntimeError as e:   # a symlink loop (Python < 3.13; later ones raise OSError)
        raise OSError(str(e)) from None
    if not target.is_relative_to(root.resolve()):
        raise ValueError(f"{relative!r} is outside the job's output directory")
    return target

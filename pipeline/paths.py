"""Where things are: the repository root (for the committed models and configs) and local paths made absolute."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def absolute_uri(uri: str) -> str:
    """A URI with a scheme as it is; a local path made absolute, since Ray workers may not share the driver's
    working directory."""
    if "://" in uri:
        return uri
    p = Path(uri).expanduser()
    return str(p if p.is_absolute() else (Path.cwd() / p).resolve())


def shipped_path(path: str | Path) -> Path:
    """A path as given when it exists (absolute, or relative to the working directory), else relative to the
    repository, where the committed models and job configs live."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p.resolve() if p.exists() else p
    return REPO_ROOT / p

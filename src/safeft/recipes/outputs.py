"""Output directories and atomic JSON files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def prepare_output(path: str | Path, overwrite: bool) -> Path:
    """Return ``path`` ready to write into; refuse a non-empty existing directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} already exists and is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | Path, data) -> None:
    """Write ``data`` as indented JSON atomically: a reader (or a killed writer) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

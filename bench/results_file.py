"""How the bench scripts write their JSON results (they run as `python bench/<script>.py`, so bench/ is on
their path)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> None:
    """Whole or not at all: a time limit's kill in mid-write must not leave a cut file of earlier rows."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)

"""Where dallekit keeps what it builds once and reuses: `$DALLEKIT_CACHE`, or `~/.cache/dallekit`."""

import os
from pathlib import Path


def dallekit_cache_dir(name: str) -> Path:
    """`$DALLEKIT_CACHE/name`, or `~/.cache/dallekit/name` when the variable is unset (not created)."""
    root = os.environ.get("DALLEKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "dallekit") / name

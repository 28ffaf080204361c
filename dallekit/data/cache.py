"""Where dallekit keeps what it builds once and reuses (`$DALLEKIT_CACHE`, or `~/.cache/dallekit`), and the
fingerprints of data sources and splits that such caches are keyed by."""

import dataclasses
import os
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher, generate_fingerprint

from .config import DataConfig
from .shards import is_shard_source, shard_files


def dallekit_cache_dir(name: str) -> Path:
    """`$DALLEKIT_CACHE/name`, or `~/.cache/dallekit/name` when the variable is unset (not created)."""
    root = os.environ.get("DALLEKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "dallekit") / name


def source_fingerprint(config: DataConfig) -> str:
    """A digest of `config` and of the name, size and modification time of every local file its source
    (and `validation_source`, `replay_source`) names: it changes when a file is added, removed or rewritten. A stream has no
    fingerprint of its own (`datasets` gives map-style datasets one); a Hub source is known by its id only."""
    sources = filter(None, (config.source, config.validation_source, config.replay_source))
    return Hasher.hash([dataclasses.asdict(config), [local_files(source) for source in sources]])


def local_files(source: str) -> list[tuple[str, int, int]]:
    """(path, size, modification time) of every local file `source` names (a folder's, recursively; a file; shards):
    what changes when a file is added, removed or rewritten. Empty for a Hub id."""
    names = [name for group in shard_files(source).values() for name in group] if is_shard_source(source) \
        else [os.path.expanduser(source)]
    files = []
    for name in names:
        if os.path.isdir(name):
            files += [os.path.join(root, file) for root, _, found in os.walk(name) for file in found]
        elif os.path.isfile(name):
            files.append(name)
    return [(os.path.abspath(file), os.stat(file).st_size, os.stat(file).st_mtime_ns) for file in sorted(files)]


def split_fingerprint(split: datasets.Dataset) -> str:
    """A digest of a map-style split's contents (`datasets.fingerprint.generate_fingerprint`): its table (each Arrow
    file's path and modification time, or the rows held in memory), indices, features and format, so a shuffled,
    selected or concatenated split gets its own. `datasets` keeps no public fingerprint of a dataset's history."""
    return generate_fingerprint(split)

"""Checks of a local image folder before `datasets.load_dataset` reads it, each problem one line.

A folder of the `datasets` imagefolder convention holds images and `metadata.jsonl` (one JSON
object per line) or `metadata.csv` (a header, then one row per image), each row naming an image
by `file_name` (relative to the metadata file's folder) with its caption. `check_image_folder`
reads the metadata itself, with `json` and `csv`, so that what `datasets` and pyarrow would report
as a traceback ("Column(s) ['text'] not found", "Invalid encoding in string. in row 10", a
`UnicodeDecodeError`) is a `DataError` naming the file, the line, what is wrong and the fix.
What can still train is warned about with a count: files named but missing, empty captions.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shlex
from dataclasses import dataclass

logger = logging.getLogger(__name__)

METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# what `datasets` reads as images (its imagefolder's extensions), and files it reads as data instead
IMAGE_EXTENSIONS = frozenset({
    ".blp", ".bmp", ".dib", ".bufr", ".cur", ".pcx", ".dcx", ".dds", ".ps", ".eps", ".fit", ".fits", ".fli",
    ".flc", ".ftc", ".ftu", ".gbr", ".gif", ".grib", ".png", ".apng", ".jp2", ".j2k", ".jpc", ".jpf", ".jpx",
    ".j2c", ".icns", ".ico", ".im", ".iim", ".tif", ".tiff", ".jfif", ".jpe", ".jpg", ".jpeg", ".mpg", ".mpeg",
    ".msp", ".pcd", ".pxr", ".pbm", ".pgm", ".ppm", ".pnm", ".psd", ".bw", ".rgb", ".rgba", ".sgi", ".ras",
    ".tga", ".icb", ".vda", ".vst", ".webp", ".wmf", ".emf", ".xbm", ".xpm", ".avif", ".heic", ".heif",
})
DATA_EXTENSIONS = frozenset({".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".txt", ".zip", ".tar", ".gz",
                             ".tgz", ".xz", ".zst", ".bz2", ".lz4", ".h5", ".hdf5", ".sql", ".db", ".webdataset"})
_BOM = b"\xef\xbb\xbf"
# fields that the CSV reader of `datasets` (pandas) reads as missing values, not as text
CSV_MISSING_VALUES = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                                "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class DataError(ValueError):
    """A problem with the data, in one line: the file (and line, where there is one), what is wrong, the fix."""


class DataSourceNotFoundError(DataError, FileNotFoundError):
    """The data source is no built-in dataset, no existing folder, and no Hub dataset that can be reached."""


@dataclass(frozen=True)
class FolderSummary:
    """What `check_image_folder` found: metadata rows, images on disk, rows whose file is missing, empty captions."""

    rows: int
    images: int
    missing: int
    empty_captions: int


def _example(file_name: str, text_column: str | None) -> str:
    return json.dumps({"file_name": file_name, text_column or "text": "a red circle"})


def _walk(folder: str) -> tuple[list[str], list[str], list[str], set[str]]:
    """(images, metadata files, other data files, every file) under `folder`, skipping hidden names as `datasets`
    does; paths start with `folder` as given."""
    images, metadata, others, everything = [], [], [], set()
    for root, directories, files in os.walk(folder):
        directories[:] = sorted(name for name in directories if not name.startswith((".", "__")))
        for name in sorted(files):
            if name.startswith((".", "__")):
                continue
            path = os.path.join(root, name)
            everything.add(os.path.normpath(path))
            extension = os.path.splitext(name)[1].lower()
            if name in METADATA_FILENAMES:
                metadata.append(path)
            elif extension in IMAGE_EXTENSIONS:
                images.append(path)
            elif extension in DATA_EXTENSIONS:
                others.append(path)
    return images, metadata, others, everything


def _decode(path: str, data: bytes) -> str:
    """`data` as UTF-8 (a leading byte-order mark dropped); a DataError naming the line of the first bad byte."""
    data = data.removeprefix(_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        quoted = shlex.quote(path)
        raise DataError(
            f"{path}, line {line}: byte 0x{data[error.start]:02x} (column {column}) is not UTF-8 (the file looks "
            f"Latin-1 or Windows-1252 encoded): convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {quoted} > "
            f"utf8.tmp && mv utf8.tmp {quoted}"
        ) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _kind(value: object) -> str:
    """The JSON type pyarrow infers a column from ("number" for ints and floats alike)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _jsonl_rows(path: str, text: str, text_column: str | None) -> tuple[list[str], list[tuple[int, dict]]]:
    rows, columns, kinds = [], {}, {}
    example = _example("0001.png", text_column)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}): write one JSON object "
                f"per line, e.g. {example}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {number}: a JSON {_kind(row)}, not an object: write one JSON object per line, "
                f"e.g. {example}"
            )
        for key, value in row.items():
            columns.setdefault(key, None)
            if value is None:
                continue
            first = kinds.setdefault(key, (_kind(value), number))
            if first[0] != _kind(value):
                raise DataError(
                    f"{path}, line {number}: {key!r} is a {_kind(value)} here but a {first[0]} on line {first[1]}: "
                    f"give {key!r} the same type in every row (or drop it)"
                )
        rows.append((number, row))
    return list(columns), rows


def _csv_rows(path: str, text: str) -> tuple[list[str], list[tuple[int, dict]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict]] = []
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(fields)} fields, but the header has {len(header)} "
                    f"({','.join(header)}): quote a caption that holds a comma, e.g. 0001.png,\"a red, round thing\""
                )
            rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({error}): write a header line, then "
                        "one row per image, e.g. file_name,text") from None
    return header, rows


def _caption_fix(columns: list[str], first_row: dict, text_column: str) -> str:
    """How to name the caption column: rename the likeliest one, or point DataConfig.text_column at it."""
    likely = [name for name in columns if name != "file_name" and not name.endswith("file_name")
              and isinstance(first_row.get(name), str)]
    if not likely:
        return f"add a {text_column!r} caption to every row"
    return (f"rename {likely[0]!r} to {text_column!r} in it, or name the caption column: "
            f"dallekit train --caption-column {likely[0]} (DataConfig.text_column)")


def check_image_folder(folder: str, text_column: str | None = "text") -> FolderSummary | None:
    """Raise a one-line `DataError` for what would keep `folder` from loading as captioned images.

    Checks every `metadata.jsonl` / `metadata.csv` under `folder`: UTF-8, valid JSON / CSV per line,
    a `file_name` in every row, the caption column `text_column` (unless None: columns not yet
    known) holding a string in every row, one type per column, and that some named file exists.
    Warns (once per call, with counts) about named files that are missing and empty captions.
    Returns None for a folder of other data files (parquet, csv, json without images) that
    `datasets` reads itself.
    """
    images, metadata, others, everything = _walk(folder)
    if not metadata:
        if images:
            first = os.path.relpath(images[0], folder)
            raise DataError(
                f"no metadata file found in {folder} ({len(images)} images, no metadata.jsonl or metadata.csv): add "
                f"metadata.jsonl with one {_example(first, text_column)} per line"
            )
        if others:
            return None
        raise DataError(
            f"{folder} holds no images and no metadata.jsonl: put your images there with a metadata.jsonl of one "
            f"{_example('0001.png', text_column)} per line"
        )
    formats = sorted({os.path.splitext(path)[1] for path in metadata})
    if len(formats) > 1:
        raise DataError(
            f"{folder} holds metadata files of different formats ({', '.join(metadata)}): keep one format, "
            "metadata.jsonl or metadata.csv, in every folder"
        )
    if formats == [".parquet"]:
        return None  # typed columns: `datasets` reports its own problems precisely enough
    total = missing = empty = 0
    numeric = text_column is not None
    first_missing = first_empty = None
    seen_columns: tuple[str, list[str]] | None = None
    for path in metadata:
        with open(path, "rb") as file:
            text = _decode(path, file.read())
        columns, rows = _jsonl_rows(path, text, text_column) if path.endswith(".jsonl") else _csv_rows(path, text)
        kind = "line" if path.endswith(".jsonl") else "row"
        if not rows:
            raise DataError(f"{path} has no rows: add one {_example('0001.png', text_column)} per {kind}")
        if seen_columns is not None and set(columns) != set(seen_columns[1]):
            raise DataError(
                f"{path} has the columns {', '.join(columns)} but {seen_columns[0]} has {', '.join(seen_columns[1])}: "
                "give every metadata file the same columns"
            )
        seen_columns = seen_columns or (path, columns)
        if "file_name" not in columns:
            if any(name.endswith(("file_name", "file_names")) for name in columns):
                continue  # `*_file_name(s)` columns: several images per row, which `datasets` checks itself
            raise DataError(
                f"{path} has no file_name column (columns: {', '.join(columns) or 'none'}): give every row the "
                f"image's file name, relative to {os.path.dirname(path) or '.'}, e.g. "
                f"{_example('0001.png', text_column)}"
            )
        if text_column is not None and text_column not in columns:
            raise DataError(f"{path} has no {text_column!r} column (columns: {', '.join(columns)}): "
                            + _caption_fix(columns, rows[0][1], text_column))
        directory = os.path.dirname(path)
        for number, row in rows:
            file_name = row.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise DataError(f"{path}, line {number}: file_name is {file_name!r}, not a file name: name the "
                                "row's image, relative to the metadata file's folder (or drop the row)")
            if text_column is not None:
                caption = row.get(text_column)
                if not isinstance(caption, str):
                    raise DataError(f"{path}, line {number}: {text_column} is {caption!r}, not a caption: give every "
                                    "row a caption string, or drop the row")
                if kind == "row" and caption in CSV_MISSING_VALUES:
                    what = "empty" if caption == "" else repr(caption)
                    raise DataError(f"{path}, line {number}: {text_column} is {what}, which a CSV reader reads as a "
                                    "missing value: give the row a caption, or drop it (or use metadata.jsonl)")
                if not caption.strip():
                    empty += 1
                    first_empty = first_empty or f"{path}, line {number}"
            total += 1
            numeric = numeric and kind == "row" and _is_number(caption)
            image = os.path.normpath(os.path.join(directory, file_name))
            if image not in everything and not os.path.isfile(image):
                missing += 1
                first_missing = first_missing or (image, path, number)
    if total and numeric:
        raise DataError(f"every {text_column} in {', '.join(metadata)} is a number, which a CSV reader reads as "
                        "numbers, not captions: write captions as words (e.g. 'the digit 7'), or use metadata.jsonl")
    if total and missing == total:
        image, path, number = first_missing
        raise DataError(
            f"none of the {total} files that the metadata names exist: {image} ({path}, line {number}) is not there; "
            f"file_name is relative to the metadata file's folder ({len(images)} images are in {folder})"
        )
    if missing:
        image, path, number = first_missing
        logger.warning("%d of the %d files named in %s's metadata are missing (the first: %s, %s line %d): "
                       "they are skipped", missing, total, folder, image, path, number)
    if empty:
        logger.warning("%d of the %d captions in %s are empty (the first: %s): they train as the unconditional "
                       "caption; give those rows a caption, or drop them", empty, total, folder, first_empty)
    return FolderSummary(rows=total, images=len(images), missing=missing, empty_captions=empty)

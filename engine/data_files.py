"""Data files read line by line, every problem named by file and line: the one place that decodes a line,
parses a JSON row and applies `data.bad_rows` (error, or skip and count).

    skipped = []
    for text in text_lines(path, "skip", skipped): ...          # a .txt file's non-empty lines
    for lineno, raw in byte_lines(path, start, end): ...        # raw lines of a byte range; lineno() when reported
    for lineno, row in json_rows(path, "error", skipped): ...   # the JSON objects of a JSON Lines file
    obj, problem = json_line(raw)                               # (row, None) or (None, "not valid JSON ...")
    bad_row(path, lineno(), problem, bad_rows, skipped)         # raise DataError, or record and go on
    report_skipped("dataset cb train", skipped)                 # one warning with the count, if any

Files are read as bytes, so a non-UTF-8 byte is reported with its line and column, never as a bare
UnicodeDecodeError; a truncated JSON row likewise names its line, never `line 1 column 14` of the row itself.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from engine.errors import FlanError

BAD_ROWS = ("error", "skip")


class DataError(FlanError, ValueError):
    """A data file is missing, empty or holds a malformed row (exit 1: fix the file or skip its bad rows)."""


def decode_line(line: bytes) -> tuple[str | None, str | None]:
    """(text, None) for a UTF-8 line, (None, why) otherwise."""
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1}); re-save the file as UTF-8"


def json_line(line: bytes) -> tuple[object, str | None]:
    """(value, None) for a line holding one JSON value, (None, why) otherwise; why is "blank" for an empty line."""
    if not line.strip():
        return None, "blank"
    text, problem = decode_line(line)
    if problem:
        return None, problem
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg}, column {e.colno})"


def bad_row(path: Path, lineno: int, problem: str, bad_rows: str, skipped: list[str]) -> None:
    """Stop with an error naming file and line (bad_rows="error"), or record the row as skipped."""
    if bad_rows != "skip":
        raise DataError(f"{path}:{lineno}: {problem}; fix the row, or set --data.bad_rows=skip "
                        "to skip and count bad rows")
    skipped.append(f"{path}:{lineno}: {problem}")


def report_skipped(what: str, skipped: list[str]) -> None:
    """One warning with the number of rows skipped under bad_rows=skip and the first of them."""
    if skipped:
        warnings.warn(f"{what}: skipped {len(skipped)} malformed rows (data.bad_rows=skip); the first: "
                      f"{skipped[0]}", stacklevel=3)


def byte_lines(path: Path, start: int = 0, end: int | None = None):
    """(line number, raw line) of a file, or of the lines starting in its byte range [start, end) (the line holding
    `start` belongs to the range before). The number is a callable: a range's first line number is counted from
    the file's start only when asked for, i.e. when a row is reported, so reading a range costs only the range."""
    with path.open("rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before `start`
        first, index = f.tell(), 0
        while end is None or f.tell() < end:
            line = f.readline()
            if not line:
                break
            yield (lambda i=index: line_number(path, first) + i), line
            index += 1


def json_rows(path: Path, bad_rows: str, skipped: list[str], start: int = 0, end: int | None = None):
    """(line number callable, row) of each JSON object line of a JSON Lines file (or a byte range of it, as
    byte_lines reads it); blank lines are passed over, any other line is a bad row."""
    for lineno, line in byte_lines(path, start, end):
        row, problem = json_line(line)
        if problem == "blank":
            continue
        if problem is None and not isinstance(row, dict):
            problem = f"a row must be a JSON object, got {type(row).__name__}"
        if problem:
            bad_row(path, lineno(), problem, bad_rows, skipped)
        else:
            yield lineno, row


def text_lines(path: Path, bad_rows: str, skipped: list[str], start: int = 0, end: int | None = None):
    """The stripped non-empty lines of a text file (or of a byte range of it, as byte_lines reads it)."""
    for lineno, line in byte_lines(path, start, end):
        text, problem = decode_line(line)
        if problem:
            bad_row(path, lineno(), problem, bad_rows, skipped)
        elif text.strip():
            yield text.strip()


def line_number(path: Path, offset: int) -> int:
    """The number (1-based) of the line starting at byte `offset`."""
    if offset == 0:
        return 1
    with path.open("rb") as f:
        count, left = 1, offset
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count

"""Local text files as documents: the one reader behind `jaxlm.data.prepare` (files ->
a TFDS dataset) and the SentencePiece trainer (`jaxlm.data.tokenizers train`).

.txt files are strict UTF-8 and split into documents by `unit` (the whole file, blank-line
separated paragraphs, or lines); .jsonl files hold one document per line, in the string
field `text_key`. Every problem is a DataError naming the file and, where there is one,
the line: a missing or empty file, bytes that are not UTF-8, a line that is not JSON or
lacks the field.
"""

from __future__ import annotations

import json
import pathlib

from jaxlm.errors import DataError

UNITS = ("file", "paragraph", "line")


def read_text_file(path: str | pathlib.Path, unit: str = "file",
                   text_key: str = "text") -> list[str]:
    """The documents of one local file (see the module docstring)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        return [_jsonl_text(line, text_key, path, n)
                for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    text = decode_utf8(data, path)
    if unit == "file":
        return [text]
    if unit == "line":
        return [ln for ln in text.split("\n") if ln.strip()]
    paragraphs, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current) + "\n")
            current = []
    if current:
        paragraphs.append("\n".join(current) + "\n")
    return paragraphs


def decode_utf8(data: bytes, path: pathlib.Path, line: int | None = None) -> str:
    """Strict UTF-8 decoding; the error names the file and the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = line if line is not None else data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{where}: not UTF-8 (byte 0x{data[e.start]:02x}); "
                        "convert the file to UTF-8 first") from None


def _jsonl_text(line: bytes, text_key: str, path: pathlib.Path, n: int) -> str:
    try:
        record = json.loads(decode_utf8(line, path, n))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        raise DataError(f"{path}:{n}: no string field {text_key!r}")
    return record[text_key]

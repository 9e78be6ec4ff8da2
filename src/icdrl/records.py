"""Versioned JSON Lines files, written atomically.

Every file starts with a header line ``{"schema": name, "version": v}``. Readers reject a
file whose header names another schema or an unknown version, with one line naming the file.
Writers write a temporary file in the destination folder and ``os.replace`` it, so a killed
job never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# schema name -> current version
SCHEMAS: dict[str, int] = {
    "icdrl.pools": 1,
    "icdrl.candidates": 1,
    "icdrl.scored": 1,
    "icdrl.rewards": 1,
    "icdrl.eval": 1,
}


class SchemaError(ValueError):
    """A file does not carry the schema/version its reader expects."""


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _default(o: Any) -> Any:
    # numpy scalars/arrays and dataclasses end up here
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_jsonl(path: str | os.PathLike, schema: str, records: Iterable[dict]) -> int:
    """Write ``records`` under a ``schema`` header, atomically. Returns the record count."""
    if schema not in SCHEMAS:
        raise SchemaError(f"{path}: unknown schema {schema!r}; known: {sorted(SCHEMAS)}")
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(json.dumps({"schema": schema, "version": SCHEMAS[schema]}) + "\n")
            for rec in records:
                fh.write(json.dumps(rec, default=_default, allow_nan=False) + "\n")
                n += 1
    return n


def iter_jsonl(path: str | os.PathLike, schema: str) -> Iterator[dict]:
    """Yield the records of a file written by :func:`write_jsonl` with the same schema."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found (expected schema {schema})")
    with open(path) as fh:
        first = fh.readline()
        try:
            header = json.loads(first) if first.strip() else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or "schema" not in header:
            raise SchemaError(f"{path}: no schema header line; expected {schema} v{SCHEMAS.get(schema)}")
        if header["schema"] != schema:
            raise SchemaError(f"{path}: schema is {header['schema']!r}, expected {schema!r}")
        if header.get("version") != SCHEMAS[schema]:
            raise SchemaError(
                f"{path}: {schema} version {header.get('version')!r} is not supported "
                f"(this icdrl reads version {SCHEMAS[schema]})"
            )
        for lineno, line in enumerate(fh, start=2):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SchemaError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def read_jsonl(path: str | os.PathLike, schema: str) -> list[dict]:
    return list(iter_jsonl(path, schema))

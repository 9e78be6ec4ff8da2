"""Versioned JSON Lines files, written atomically and verifiably complete.

Every file starts with a header line ``{"schema": name, "version": v}`` and ends with an end
line ``{"end": name, "records": n}``, written last. Readers reject a file whose header names
another schema or an unknown version, and a file without its end line or whose record count
differs from it (a file cut short, even at a line boundary), with one line naming the file and
what is missing. Neither line is a record: :func:`iter_jsonl` yields the records only.
Writers write a temporary file in the destination folder and ``os.replace`` it, so a killed
job never leaves a half-written output behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)

# schema name -> current version
SCHEMAS: dict[str, int] = {
    "icdrl.pools": 1,
    "icdrl.candidates": 1,
    "icdrl.scored": 1,
    "icdrl.rewards": 1,
    "icdrl.eval": 2,
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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
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
            fh.write(json.dumps(end_line(schema, n)) + "\n")
    return n


def remake(path: str | os.PathLike) -> str:
    """What to do about an incomplete output of an earlier job: rerun that job. (Deleting it is
    not enough: Snakemake does not remake a missing intermediate whose outputs are up to date.)"""
    return f"remake it: snakemake --force {path} (with this run's options)"


def end_line(schema: str, n: int) -> dict:
    """The last line of a complete file of ``schema`` holding ``n`` records."""
    return {"end": schema, "records": n}


def is_end_line(d: Any) -> bool:
    """Whether a parsed line is an end line (never a record: records have no ``end`` key)."""
    return isinstance(d, dict) and set(d) == {"end", "records"}


def _last_line(path: Path, block: int = 4096) -> str | None:
    """The last non-empty line of ``path`` if it fits in the file's last ``block`` bytes."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = max(0, size - block)
        fh.seek(start)
        tail = fh.read()
    lines = tail.rstrip(b"\n").split(b"\n")
    if len(lines) < 2 and start > 0:
        return None  # no line break in the tail: the last line is longer than any end line
    return lines[-1].decode("utf-8", errors="replace") if lines[-1].strip() else None


def _expected_count(path: Path, schema: str) -> int:
    """The record count of a file's end line; refuses a file without one (cut short)."""
    line = _last_line(path)
    try:
        d = json.loads(line) if line is not None else None
    except json.JSONDecodeError:
        d = None
    if (
        not is_end_line(d)
        or d["end"] != schema
        or isinstance(d["records"], bool)
        or not isinstance(d["records"], int)
    ):
        raise SchemaError(
            f'{path}: incomplete: no end line {{"end": "{schema}", "records": N}} '
            f"(cut short, or written by an older icdrl); {remake(path)}"
        )
    return d["records"]


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NonFinite(name)


def _non_finite_field(obj: Any, where: str = "") -> str:
    """The first field of a parsed record holding NaN or ±inf, e.g. ``rewards[2]``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        found = _non_finite_field(
            v, f"{where}[{k}]" if isinstance(k, int) else (f"{where}.{k}" if where else k)
        )
        if found:
            return found
    return ""


def _describe(schema: str, d: Any) -> str:
    """``anchor 5`` / ``query 7`` / ``record (...)``: which record of a file a line holds."""
    try:
        key = record_key(schema, d)
    except (SchemaError, TypeError):
        return "record"
    if schema == "icdrl.pools":
        return f"query {key}"
    if schema in ("icdrl.candidates", "icdrl.scored", "icdrl.rewards"):
        return f"anchor {key}"
    return f"record {key}"


def _parse_line(line: str, path: Path, lineno: int, schema: str) -> Any:
    """One JSON line; NaN and ±Infinity (which Python's json would accept) are refused: the
    writers never write them, so one in a file is corruption."""
    try:
        return json.loads(line, parse_constant=_refuse_constant)
    except _NonFinite as e:
        d = json.loads(line)
        raise SchemaError(
            f"{path}:{lineno}: {_describe(schema, d)}: field {_non_finite_field(d) or '?'} "
            f"is {e}, not a finite number; {remake(path)}"
        ) from None
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}:{lineno}: invalid JSON ({e.msg}); {remake(path)}") from None


def _parse_header(first: str) -> dict | None:
    """A file's first line as a header dict, or None where it is empty or not a JSON object."""
    try:
        header = json.loads(first) if first.strip() else None
    except json.JSONDecodeError:
        return None
    return header if isinstance(header, dict) else None


def iter_jsonl(path: str | os.PathLike, schema: str) -> Iterator[dict]:
    """Yield the records of a file written by :func:`write_jsonl` with the same schema.

    The header and the end line are checked before the first record is yielded, the record
    count after the last one: a file cut short is refused with one line naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found (expected schema {schema})")
    with open(path) as fh:
        header = _parse_header(fh.readline())
        if header is None or "schema" not in header:
            raise SchemaError(
                f"{path}: no schema header line; expected {schema} v{SCHEMAS.get(schema)}"
            )
        if header["schema"] != schema:
            raise SchemaError(f"{path}: schema is {header['schema']!r}, expected {schema!r}")
        if header.get("version") != SCHEMAS[schema]:
            raise SchemaError(
                f"{path}: {schema} version {header.get('version')!r} is not supported "
                f"(this icdrl reads version {SCHEMAS[schema]})"
            )
        expected = _expected_count(path, schema)
        n, ended = 0, False
        for lineno, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            if ended:
                raise SchemaError(f"{path}:{lineno}: a line after the end line; {remake(path)}")
            d = _parse_line(line, path, lineno, schema)
            if is_end_line(d):
                ended = True
                continue
            n += 1
            yield d
        if n != expected:
            raise SchemaError(
                f"{path}: incomplete: {n} records, its end line says {expected}; {remake(path)}"
            )


def read_jsonl(path: str | os.PathLike, schema: str) -> list[dict]:
    return list(iter_jsonl(path, schema))


# ---------------------------------------------------------------------------------------------
# Other outputs: CSV tables with an end line; zip-based binaries (.npz, torch checkpoints)
# ---------------------------------------------------------------------------------------------

CSV_END = "# end: {n} rows"

# The columns of a selector's training metrics.csv, one row per epoch: icdrl.train writes them,
# icdrl.report.inputs reads them (empty cells where a metric does not apply to the phase).
METRIC_COLUMNS: tuple[str, ...] = (
    "phase",
    "epoch",
    "loss",
    "ppo_loss",
    "kl",
    "ratio_mean",
    "ratio_max",
    "clip_frac",
    "adv_std",
    "groups_kept",
    "groups_skipped",
    "val_reward",
)


def csv_end_line(n: int) -> str:
    """The last line of a complete CSV of ``n`` data rows (a comment: ``pandas.read_csv(...,
    comment="#")`` skips it)."""
    return CSV_END.format(n=n)


def check_csv_complete(path: str | os.PathLike) -> int:
    """The data-row count of a CSV written with :func:`csv_end_line` last; refuses a CSV without
    it or whose row count differs (cut short), with one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    prefix, _, rest = last.partition(": ")
    n_text = rest[: -len(" rows")] if rest.endswith(" rows") else ""
    if prefix != "# end" or not n_text.isdigit():
        raise SchemaError(
            f"{path}: incomplete: no end line '{csv_end_line(0).replace('0', 'N')}' "
            f"(cut short, or written by an older icdrl); {remake(path)}"
        )
    n = int(n_text)
    rows = len(lines) - 2  # header and end line
    if rows != n:
        raise SchemaError(f"{path}: incomplete: {rows} rows, its end line says {n}; {remake(path)}")
    return n


def corrupt_file_error(path: str | os.PathLike, e: BaseException) -> SchemaError:
    """One line for a binary output (``.npz``, ``.pt``) that cannot be read: cut short or corrupt."""
    first = (str(e).strip().splitlines() or [""])[0][:120]
    return SchemaError(
        f"{path}: cannot be read, cut short or corrupt ({type(e).__name__}: {first}); {remake(path)}"
    )


# ---------------------------------------------------------------------------------------------
# Record dataclasses (docs/ARCHITECTURE.md "Files and schema versions")
# ---------------------------------------------------------------------------------------------


#: Where a candidate sequence came from (docs/science.md §4).
SOURCES: tuple[str, ...] = ("beam", "random", "similar")

#: Evaluation methods (docs/science.md §8): the ablations (``shuffled``, ``no_images``) re-answer another
#: method's ICDs, named in their ``spec`` (``icdrl.ablations``).
METHODS: tuple[str, ...] = (
    "zero_shot",
    "random",
    "similarity",
    "rices_image",
    "rices_text",
    "rices",
    "copy",
    "v2",
    "v3",
    "per_shot",
    "shuffled",
    "no_images",
)


def _field_error(where: str, name: str, msg: str) -> SchemaError:
    return SchemaError(f"{where}: field {name!r} {msg}")


def _get(d: dict, name: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if name not in d:
        raise _field_error(where, name, "is missing")
    return d[name]


def _int(d: dict, name: str, where: str) -> int:
    v = _get(d, name, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _field_error(where, name, f"must be an integer, got {v!r}")
    return v


def _opt_int(d: dict, name: str, where: str) -> int | None:
    return None if d.get(name) is None else _int(d, name, where)


def _float(d: dict, name: str, where: str) -> float:
    v = _get(d, name, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _field_error(where, name, f"must be a finite number, got {v!r}")
    return float(v)


def _opt_float(d: dict, name: str, where: str) -> float | None:
    return None if d.get(name) is None else _float(d, name, where)


def _str(d: dict, name: str, where: str) -> str:
    v = _get(d, name, where)
    if not isinstance(v, str):
        raise _field_error(where, name, f"must be a string, got {v!r}")
    return v


def _opt_str(d: dict, name: str, where: str) -> str | None:
    return None if d.get(name) is None else _str(d, name, where)


def _int_list(d: dict, name: str, where: str) -> tuple[int, ...]:
    v = _get(d, name, where)
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise _field_error(where, name, f"must be a list of integers, got {v!r}")
    return tuple(v)


def _float_list(d: dict, name: str, where: str) -> tuple[float, ...]:
    v = _get(d, name, where)
    if not isinstance(v, list) or any(
        isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v
    ):
        raise _field_error(where, name, f"must be a list of finite numbers, got {v!r}")
    return tuple(float(x) for x in v)


def _as_json(rec: Any) -> dict:
    """A record dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(rec), allow_nan=False))


@dataclass(frozen=True)
class PoolRecord:
    """One query and its pool of K train ids (``icdrl.pools``)."""

    SCHEMA: ClassVar[str] = "icdrl.pools"
    query_id: int
    pool: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict, where: str = "record") -> PoolRecord:
        return cls(query_id=_int(d, "query_id", where), pool=_int_list(d, "pool", where))

    def to_dict(self) -> dict:
        return _as_json(self)


@dataclass(frozen=True)
class Candidate:
    """A candidate ICD sequence of an anchor, in prompt order (first = farthest from the query).

    ``info_score`` = P(a|S,q) − P(a|∅,q); ``step_gains[t]`` is the gain of the t-th build step
    (the items are added in the order fixed by the insertion side, docs/science.md §4), so
    ``sum(step_gains) == info_score`` up to rounding.
    """

    source: str
    icd_ids: tuple[int, ...]
    icd_pos: tuple[int, ...]
    info_score: float
    step_gains: tuple[float, ...]

    def __post_init__(self):
        if self.source not in SOURCES:
            raise SchemaError(f"candidate source {self.source!r} is not one of {SOURCES}")
        if len(self.icd_ids) != len(self.icd_pos) or len(self.step_gains) != len(self.icd_ids):
            raise SchemaError(
                f"candidate {self.source}: icd_ids, icd_pos and step_gains differ in length "
                f"({len(self.icd_ids)}, {len(self.icd_pos)}, {len(self.step_gains)})"
            )

    @staticmethod
    def _base_kwargs(d: dict, where: str) -> dict:
        return dict(
            source=_str(d, "source", where),
            icd_ids=_int_list(d, "icd_ids", where),
            icd_pos=_int_list(d, "icd_pos", where),
            info_score=_float(d, "info_score", where),
            step_gains=_float_list(d, "step_gains", where),
        )

    @classmethod
    def from_dict(cls, d: dict, where: str = "candidate") -> Candidate:
        return cls(**cls._base_kwargs(d, where))

    def to_dict(self) -> dict:
        return _as_json(self)


@dataclass(frozen=True)
class ScoredCandidate(Candidate):
    """A candidate with the LVLM's greedy answer for its anchor (docs/science.md §5)."""

    prediction_raw: str
    prediction: str
    vqa_acc_score: float
    vqa_correct: int

    @classmethod
    def from_dict(cls, d: dict, where: str = "candidate") -> ScoredCandidate:
        correct = _int(d, "vqa_correct", where)
        if correct not in (0, 1):
            raise _field_error(where, "vqa_correct", f"must be 0 or 1, got {correct!r}")
        return cls(
            **cls._base_kwargs(d, where),
            prediction_raw=_str(d, "prediction_raw", where),
            prediction=_str(d, "prediction", where),
            vqa_acc_score=_float(d, "vqa_acc_score", where),
            vqa_correct=correct,
        )

    @classmethod
    def from_candidate(
        cls,
        c: Candidate,
        *,
        prediction_raw: str,
        prediction: str,
        vqa_acc_score: float,
        vqa_correct: int,
    ) -> ScoredCandidate:
        return cls(
            **{f.name: getattr(c, f.name) for f in dataclasses.fields(Candidate)},
            prediction_raw=prediction_raw,
            prediction=prediction,
            vqa_acc_score=float(vqa_acc_score),
            vqa_correct=int(vqa_correct),
        )


def _check_positions(pool: tuple[int, ...], cands: Sequence[Candidate], where: str) -> None:
    """Every candidate's positions index the pool and name the ids it records (a selector's
    labels are these pool positions, never an id mod the pool size)."""
    for i, c in enumerate(cands):
        for p, g in zip(c.icd_pos, c.icd_ids):
            if not 0 <= p < len(pool) or pool[p] != g:
                raise SchemaError(
                    f"{where}: candidate {i}: icd_pos {p} does not hold icd_id {g} in the pool "
                    f"(its icd_pos {list(c.icd_pos)} do not point at icd_ids {list(c.icd_ids)})"
                )
        if len(set(c.icd_pos)) != len(c.icd_pos):
            raise SchemaError(f"{where}: candidate {i} repeats a pool position: {list(c.icd_pos)}")


@dataclass(frozen=True)
class CandidateRecord:
    """One anchor with its candidate sequences (``icdrl.candidates``).

    ``zero_shot_logprob`` is the mean answer-token log-probability with no ICD, so
    ``zero_shot_prob == exp(zero_shot_logprob)`` (docs/science.md §3).
    """

    SCHEMA: ClassVar[str] = "icdrl.candidates"
    anchor_id: int
    pool: tuple[int, ...]
    zero_shot_logprob: float
    zero_shot_prob: float
    candidates: tuple[Candidate, ...]

    @classmethod
    def from_dict(cls, d: dict, where: str = "record") -> CandidateRecord:
        anchor = _int(d, "anchor_id", where)
        where = f"{where} (anchor {anchor})"
        cands = _get(d, "candidates", where)
        if not isinstance(cands, list):
            raise _field_error(where, "candidates", "must be a list")
        rec = cls(
            anchor_id=anchor,
            pool=_int_list(d, "pool", where),
            zero_shot_logprob=_float(d, "zero_shot_logprob", where),
            zero_shot_prob=_float(d, "zero_shot_prob", where),
            candidates=tuple(
                cls._cand_type().from_dict(c, f"{where} candidate {i}") for i, c in enumerate(cands)
            ),
        )
        _check_positions(rec.pool, rec.candidates, where)
        return rec

    @staticmethod
    def _cand_type() -> type[Candidate]:
        return Candidate

    def to_dict(self) -> dict:
        return _as_json(self)


@dataclass(frozen=True)
class ScoredRecord(CandidateRecord):
    """One anchor with its scored candidates (``icdrl.scored``)."""

    SCHEMA: ClassVar[str] = "icdrl.scored"
    candidates: tuple[ScoredCandidate, ...]

    @staticmethod
    def _cand_type() -> type[Candidate]:
        return ScoredCandidate


@dataclass(frozen=True)
class EvalRecord:
    """One (method, k, query) answer (``icdrl.eval``, version 2).

    ``icd_ids``/``icd_pos`` are in prompt order (first = farthest from the query). Zero-shot
    has one record per k in the evaluated shots, all with no ICD and the same answer (generated
    once), so that every method has a value at every shot. ``cell`` and ``spec``: for a v3 cell
    its slug and canonical dict (:meth:`icdrl.grid.Cell.as_dict`: mode, knobs, use_rank, training
    overrides); for ``per_shot`` the slug of the cell chosen at this k and
    ``{"chosen": <that cell's dict>, "val_acc": ..., "n_val": ...}``; for an ablation
    (``shuffled``, ``no_images``) the ablated record's cell and ``{"ablation": ..., "of": {"method",
    "cell", "spec"} of the ablated record, "shuffle_seed": ...}``; null for other methods. RICES
    and ``copy`` records have no pool positions (``icd_pos`` empty). ``image_id`` is the query's
    ``Example.image_id`` (null if unknown): questions sharing an image are one cluster of the
    report's bootstrap.
    """

    SCHEMA: ClassVar[str] = "icdrl.eval"
    method: str
    cell: str | None
    seed: int | None
    k: int
    query_id: int
    icd_ids: tuple[int, ...]
    icd_pos: tuple[int, ...]
    prediction_raw: str
    prediction: str
    acc: float
    spec: dict | None = None
    image_id: str | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "record") -> EvalRecord:
        method = _str(d, "method", where)
        if method not in METHODS:
            raise _field_error(where, "method", f"must be one of {METHODS}, got {method!r}")
        spec = d.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise _field_error(where, "spec", f"must be an object or null, got {spec!r}")
        if method in ("v3", "per_shot") and (spec is None or d.get("cell") is None):
            raise _field_error(where, "spec", f"and 'cell' are required for method {method}")
        if method in ("shuffled", "no_images") and not isinstance((spec or {}).get("of"), dict):
            raise _field_error(
                where, "spec", f"of an ablation ({method}) must name the method it ablates ('of')"
            )
        return cls(
            method=method,
            cell=_opt_str(d, "cell", where),
            seed=_opt_int(d, "seed", where),
            k=_int(d, "k", where),
            query_id=_int(d, "query_id", where),
            icd_ids=_int_list(d, "icd_ids", where),
            icd_pos=_int_list(d, "icd_pos", where) if d.get("icd_pos") is not None else (),
            prediction_raw=_str(d, "prediction_raw", where),
            prediction=_str(d, "prediction", where),
            acc=_float(d, "acc", where),
            spec=spec,
            image_id=_opt_str(d, "image_id", where),
        )

    def to_dict(self) -> dict:
        return _as_json(self)


def read_records(path: str | os.PathLike, cls: type) -> list:
    """Read a file of ``cls`` records (``cls.SCHEMA``), validating every field."""
    return [cls.from_dict(d, f"{path}:{i + 2}") for i, d in enumerate(iter_jsonl(path, cls.SCHEMA))]


def write_records(path: str | os.PathLike, records: Sequence) -> int:
    """Write record dataclasses of one type atomically under their schema."""
    if not records:
        raise ValueError(
            f"{path}: write_records needs at least one record to know the schema; use write_jsonl"
        )
    return write_jsonl(path, type(records[0]).SCHEMA, (r.to_dict() for r in records))


def header_schema(path: str | os.PathLike) -> str | None:
    """The schema a JSON Lines file's header line names, or None where there is none to read
    (no such file, no header line); :func:`iter_jsonl` then says what is wrong."""
    try:
        with open(path) as fh:
            header = _parse_header(fh.readline())
    except (OSError, UnicodeDecodeError):
        return None
    schema = header.get("schema") if header else None
    return schema if isinstance(schema, str) else None


def _schema_of(path: Path) -> str:
    """The schema a JSON Lines file's header names (checked against the known schemas)."""
    schema = header_schema(path)
    if schema not in SCHEMAS:
        raise SchemaError(f"{path}: no icdrl schema header line; known schemas: {sorted(SCHEMAS)}")
    return schema


def _frame(records: list[dict]) -> Any:
    """Records as a DataFrame whose integer fields keep an integer dtype: int64, or pandas'
    nullable Int64 where some records have none (e.g. the ``seed`` of a baseline)."""
    import pandas as pd

    columns = list(dict.fromkeys(k for r in records for k in r))
    data = {}
    for col in columns:
        values = [r.get(col) for r in records]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            data[col] = pd.array(values, dtype="int64" if len(present) == len(values) else "Int64")
        else:
            data[col] = pd.Series(
                values, dtype=object if any(isinstance(v, (list, dict)) for v in present) else None
            )
    return pd.DataFrame(data, index=pd.RangeIndex(len(records)))


def read_table(path: str | os.PathLike):
    """Any icdrl record file as a ``pandas.DataFrame``: one row per record, integer ids kept.

    JSON Lines files (pools, candidates, scored, rewards, evaluation records) are checked like
    every reader checks them (header, end line, record count); neither line becomes a row, which
    ``pandas.read_json(path, lines=True)`` would not do. CSV tables written with an end line
    (``metrics.csv``) are checked for it. Nested fields (pools, candidate lists, specs) stay
    Python objects in their cells.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix == ".csv":
        n = check_csv_complete(path)
        df = pd.read_csv(path, skipfooter=1, engine="python")
        if len(df) != n:  # a data line pandas split or joined differently than the end line counted
            raise SchemaError(f"{path}: read {len(df)} rows, its end line says {n}")
        return df
    records = list(iter_jsonl(path, _schema_of(path)))
    return _frame(records)


# Key of one record in each schema: concatenation and resumption refuse duplicates.
_KEYS: dict[str, Callable[[dict], Hashable]] = {
    "icdrl.pools": lambda d: d["query_id"],
    "icdrl.candidates": lambda d: d["anchor_id"],
    "icdrl.scored": lambda d: d["anchor_id"],
    "icdrl.rewards": lambda d: d["anchor_id"],
    "icdrl.eval": lambda d: (d["method"], d.get("cell"), d.get("seed"), d["k"], d["query_id"]),
}


def record_key(schema: str, d: dict) -> Hashable:
    """The identity of a record in ``schema`` (anchor id, query id, ...)."""
    try:
        return _KEYS[schema](d)
    except KeyError as e:
        raise SchemaError(f"{schema} record lacks key field {e}") from None


def concat_jsonl(
    paths: Sequence[str | os.PathLike], schema: str, out_path: str | os.PathLike
) -> int:
    """Gather shard files of one schema into ``out_path`` (atomically), in the order given.

    Refuses a record key (e.g. anchor id) seen in two shards. Returns the record count.
    """
    seen: dict[Hashable, str] = {}
    recs: list[dict] = []
    for p in paths:
        for d in iter_jsonl(p, schema):
            key = record_key(schema, d)
            if key in seen:
                raise SchemaError(f"{p}: record {key!r} also appears in {seen[key]}")
            seen[key] = str(p)
            recs.append(d)
    return write_jsonl(out_path, schema, recs)


# ---------------------------------------------------------------------------------------------
# Resuming a killed run: an append-only companion file beside the output
# ---------------------------------------------------------------------------------------------


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (inputs + settings of a run)."""
    blob = json.dumps(obj, sort_keys=True, default=_default, allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PartialJsonl:
    """Records finished so far by a run that writes ``out_path``, kept in ``<out_path>.partial``.

    Each finished record is appended and flushed to disk at once, so a killed run loses at most
    the record it was working on. A later run with the same ``fp`` (fingerprint of its inputs
    and settings) takes the finished records back with :meth:`load` and computes only the rest;
    a partial file written for other inputs is discarded (and logged). :meth:`finish` writes the
    complete output atomically and removes the partial file.
    """

    def __init__(self, out_path: str | os.PathLike, schema: str, fp: str):
        if schema not in SCHEMAS:
            raise SchemaError(f"{out_path}: unknown schema {schema!r}")
        self.out_path = Path(out_path)
        self.path = self.out_path.with_name(self.out_path.name + ".partial")
        self.schema = schema
        self.fp = fp
        self._fh = None

    def _header(self) -> dict:
        return {
            "schema": self.schema,
            "version": SCHEMAS[self.schema],
            "partial": True,
            "fingerprint": self.fp,
        }

    def load(self) -> dict[Hashable, dict]:
        """Finished records by key; a torn last line (killed mid-write) is dropped."""
        done: dict[Hashable, dict] = {}
        if not self.path.exists():
            return done
        lines = self.path.read_text().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if header != self._header():
            log.warning("%s: written for other inputs or settings; starting afresh", self.path)
            self.path.unlink()
            return done
        for line in lines[1:]:
            if not line.strip():
                continue
            try:
                d = json.loads(line, parse_constant=_refuse_constant)
            except (
                json.JSONDecodeError,
                _NonFinite,
            ):  # killed mid-write, or damaged: recompute from here
                log.warning(
                    "%s: dropping a torn (or non-finite) record line and any after it", self.path
                )
                break
            done[record_key(self.schema, d)] = d
        # rewrite without a torn tail so appends start on a clean line
        self._rewrite(done.values())
        if done:
            log.info("%s: resuming with %d finished records", self.path, len(done))
        return done

    def _rewrite(self, records: Iterable[dict]) -> None:
        with atomic_path(self.path) as tmp:
            with open(tmp, "w") as fh:
                fh.write(json.dumps(self._header()) + "\n")
                for d in records:
                    fh.write(json.dumps(d, default=_default, allow_nan=False) + "\n")

    def append(self, records: Iterable[dict]) -> None:
        """Append finished records and flush them to disk."""
        if self._fh is None:
            if not self.path.exists():
                self._rewrite([])
            self._fh = open(self.path, "a")
        for d in records:
            self._fh.write(json.dumps(d, default=_default, allow_nan=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self, records: Iterable[dict]) -> int:
        """Write the complete output atomically, then drop the partial file."""
        self.close()
        n = write_jsonl(self.out_path, self.schema, records)
        self.path.unlink(missing_ok=True)
        return n

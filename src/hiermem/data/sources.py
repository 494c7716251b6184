"""Read documents from any supported source and pick a split.

Sources (``load_documents(source, ...)``):

- a built-in corpus name (``shakespeare``, ``bible-web``, ``python-docs``); a local folder that
  shares such a name is read as ``./name``;
- a ``.txt`` file (one document, id = file name) or a folder of ``.txt`` files, searched
  recursively, hidden entries skipped (one document per file, id = path relative to the folder);
- a ``.jsonl``/``.json``/``.parquet``/``.csv``/``.tsv`` table: one document per row, its text from
  ``text_column`` or ``prompt_column`` + ``prompt_separator`` + ``completion_column``; id = the
  ``id_column`` value when present, else ``<file name>:<row index>``; rows with a null or empty
  text are skipped;
- ``hf:<name or local path>``: a Hugging Face ``datasets`` dataset (hub name from the local cache,
  a local data file or folder, or a folder written by ``save_to_disk``), with ``hf_config``,
  ``hf_split`` (slices such as ``train[:10%]``) and ``streaming``. Row ids index the un-sliced
  split, so widening a slice keeps the ids (and the splits) of the rows already in it;
- a mix ``a+b+...`` of any of these (e.g. ``shakespeare+bible-web+python-docs``): each part is split
  on its own and the chosen splits are concatenated.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from hiermem.data.corpora import CORPORA, Document, corpus
from hiermem.data.splits import check_split, select_split, split_indices, split_of
from hiermem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
_HF_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                ".txt": "text", ".arrow": "arrow"}


def read_text_file(path: Path) -> str:
    """Strict UTF-8 text of a file with normalised newlines; DataError on empty, binary or other encodings."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text; convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path} is a binary file (NUL byte at offset {nul}), not text; pass UTF-8 text files")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        f"convert it to UTF-8, e.g. iconv -f LATIN1 -t UTF-8") from exc
    if not text.strip():
        raise DataError(f"{path} is empty; remove it or give it some text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Columns:
    """Which columns of a table make a document's text and id."""

    text: str = "text"
    prompt: str | None = None
    completion: str | None = None
    id: str | None = "id"
    separator: str = "\n"

    def __post_init__(self):
        if (self.prompt is None) != (self.completion is None):
            raise ConfigError("prompt_column and completion_column go together: give both or neither")

    @property
    def used(self) -> list[str]:
        return [self.prompt, self.completion] if self.prompt else [self.text]

    def check(self, columns: Iterable[str], where: str) -> None:
        columns = list(columns)
        missing = [c for c in self.used if c not in columns]
        if missing:
            raise DataError(f"{where} has no column {missing[0]!r}; columns present: "
                            f"{', '.join(map(str, columns)) or 'none'}. Choose the text column "
                            "(text_column, or prompt_column + completion_column)")

    def document(self, row: Mapping, index: int, prefix: str, where: str) -> Document | None:
        """The row's document, or None when its text is null or empty."""
        parts = []
        for column in self.used:
            value = row.get(column)
            if value is None:
                return None
            if not isinstance(value, str):
                raise DataError(f"{where}, row {index}: column {column!r} holds {type(value).__name__}, not text")
            parts.append(value)
        text = self.separator.join(parts)
        if not text.strip():
            return None
        doc_id = row.get(self.id) if self.id else None
        return Document(id=f"{prefix}:{index}" if doc_id is None else str(doc_id), text=text)


def _documents_from_rows(rows: Iterator[dict], columns: list[str] | None, cols: Columns, prefix: str,
                         where: str, start: int = 0) -> list[Document]:
    """Documents of table rows; ``columns`` None means: check the first row's keys."""
    if columns is not None:
        cols.check(columns, where)
    docs, skipped = [], 0
    for index, row in enumerate(rows, start):
        if columns is None:
            cols.check(row.keys(), where)
            columns = list(row.keys())
        doc = cols.document(row, index, prefix, where)
        if doc is None:
            skipped += 1
        else:
            docs.append(doc)
    if skipped:
        log.info("%s: skipped %d rows with no text", where, skipped)
    if not docs:
        raise DataError(f"{where} has no row with text in column(s) {', '.join(cols.used)}")
    return docs


def _json_rows(path: Path) -> tuple[list[str] | None, Iterator[dict]]:
    text = read_text_file(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); give a JSON array of objects or JSON lines") from exc
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    numbered.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {n}: not valid JSON ({exc.msg}); each line must be one "
                                    "JSON object") from exc
    for n, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}, record {n}: a JSON {type(row).__name__}, not an object with named fields")
    return None, (row for _, row in numbered)


def _csv_rows(path: Path) -> tuple[list[str] | None, Iterator[dict]]:
    text = read_text_file(path)
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents exceed the 128 kB default
    try:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from exc
    finally:
        csv.field_size_limit(limit)
    return list(reader.fieldnames or []), iter(rows)


def _parquet_rows(path: Path) -> tuple[list[str] | None, Iterator[dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError("reading .parquet files needs pyarrow: pip install 'hiermem[train]'") from exc
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; remove it or give it some rows")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants on foreign files
        raise DataError(f"{path} is not a readable Parquet file ({exc})") from exc
    names = pf.schema_arrow.names

    def rows():
        for batch in pf.iter_batches(batch_size=1024):
            yield from batch.to_pylist()

    return names, rows()


_TABLE_READERS = {".jsonl": _json_rows, ".json": _json_rows, ".csv": _csv_rows, ".tsv": _csv_rows,
                  ".parquet": _parquet_rows}


def text_files(folder: Path) -> list[tuple[str, Path]]:
    """(id, path) of the ``.txt`` files under ``folder``, sorted, hidden entries skipped."""
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        found.append((rel.as_posix(), p))
    texts = [(i, p) for i, p in found if p.suffix.lower() == ".txt"]
    if not texts:
        others = sorted({p.suffix or p.name for _, p in found})
        seen = f" (found only: {', '.join(others[:8])})" if others else ""
        raise DataError(f"folder {folder} holds no .txt files{seen}; pass a folder of .txt documents, a single "
                        f"table file, or hf:{folder} to read data files with Hugging Face datasets")
    for _, p in texts:
        if p.stat().st_size == 0:
            raise DataError(f"{p} is empty; remove it or give it some text")
    return texts


def source_files(source: str) -> list[Path] | None:
    """The local files a path source reads, or None for built-in corpora and ``hf:`` sources."""
    if source.startswith("hf:") or source in CORPORA:
        return None
    path = Path(source).expanduser()
    parts = source.split("+")
    if len(parts) > 1 and all(parts) and not path.exists():  # a mix: its parts' files, unless one has none
        files = [source_files(part) for part in parts]
        return None if any(f is None for f in files) else [p for f in files for p in f]
    if path.is_dir():
        return [p for _, p in text_files(path)]
    if path.is_file():
        return [path]
    raise DataError(_not_found(source))


def _not_found(source: str) -> str:
    return (f"data source {source!r} not found: it is not a file or folder, not a built-in corpus "
            f"({', '.join(CORPORA)}), not hf:<dataset> and not a mix of those joined by '+'")


def _parse_hf_split(spec: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[([^\]]*)\])?\s*", spec)
    if not m:
        raise DataError(f"bad Hugging Face split {spec!r}; use a name with an optional slice, e.g. train[:10%]")
    return m.group(1), m.group(2)


def _hf_dataset(name: str, config: str | None, base: str, streaming: bool):
    import datasets

    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))  # written by save_to_disk: memory-mapped already
        if isinstance(ds, datasets.DatasetDict):
            if base not in ds:
                raise DataError(f"hf:{name} has no split {base!r}; splits: {', '.join(ds)}")
            ds = ds[base]
        return ds
    if path.is_file():
        builder = _HF_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"hf:{name}: cannot read {path.suffix!r} files; use one of {', '.join(_HF_BUILDERS)}")
        return datasets.load_dataset(builder, data_files={base: str(path)}, split=base, streaming=streaming)
    return datasets.load_dataset(str(path) if path.exists() else name, config, split=base, streaming=streaming)


def _hf_documents(name: str, cols: Columns, config: str | None, split_spec: str | None,
                  streaming: bool) -> list[Document]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hf: sources need the datasets package: pip install 'hiermem[train]'") from exc
    base, piece = _parse_hf_split(split_spec or "train")
    where = f"hf:{name}" + (f" ({config})" if config else "") + f" split {base!r}"
    try:
        ds = _hf_dataset(name, config, base, streaming)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (missing files, offline hub, unknown split)
        raise DataError(f"could not load {where}: {exc}. hiermem works offline: pass a local data file or "
                        "folder (hf:./data) or a dataset already in the Hugging Face cache") from exc
    start = 0
    if piece is not None:
        if isinstance(ds, datasets.IterableDataset):
            m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", piece)
            if not m:
                raise DataError(f"{where}: streaming supports absolute slices such as {base}[100:200], not "
                                f"[{piece}]; drop streaming to use percentages")
            start = int(m.group(1) or 0)
            ds = ds.skip(start)
            if m.group(2):
                ds = ds.take(max(0, int(m.group(2)) - start))
        else:
            try:
                (inst,) = datasets.ReadInstruction.from_spec(f"{base}[{piece}]").to_absolute({base: len(ds)})
            except (ValueError, AssertionError) as exc:
                raise DataError(f"{where}: bad slice [{piece}] ({exc}); e.g. {base}[:10%] or {base}[100:200]") from exc
            start = inst.from_
            ds = ds.select(range(inst.from_, inst.to))
    columns = ds.column_names
    if columns is not None:
        cols.check(columns, where)
        keep = [c for c in columns if c in cols.used or c == cols.id]
        ds = ds.select_columns(keep)
    prefix = (Path(name).name if Path(name).expanduser().exists() else name) + (f"/{config}" if config else "")
    return _documents_from_rows(iter(ds), columns, cols, f"{prefix}/{base}", where, start)


def load_documents(source: str, split: str = "train", *, text_column: str = "text",
                   prompt_column: str | None = None, completion_column: str | None = None,
                   hf_config: str | None = None, hf_split: str | None = None, streaming: bool = False,
                   validation_fraction: float = 0.1, test_fraction: float = 0.1,
                   split_files: Mapping[str, str] | None = None, id_column: str | None = "id",
                   prompt_separator: str = "\n") -> list[Document]:
    """The documents of ``split`` ("train", "validation", "test" or "all") of ``source``.

    Splits go by a stable hash of each document id (``validation_fraction``/``test_fraction``)
    unless ``split_files`` maps split names to files listing ids one per line. In a folder of
    text files only the chosen split's files are read. See the module docstring for sources.
    """
    check_split(split)
    if split != "all" and not split_files:
        split_of("", validation_fraction, test_fraction)  # checks the fractions before any reading
    cols = Columns(text_column, prompt_column, completion_column, id_column, prompt_separator)
    options = dict(validation=validation_fraction, test=test_fraction, split_files=split_files)
    if source.startswith("hf:"):
        docs = _hf_documents(source[3:], cols, hf_config, hf_split, streaming)
        return select_split(docs, split, source=source, **options)
    if prompt_column is not None and not any(source.lower().endswith(s) for s in TABLE_SUFFIXES):
        raise ConfigError(f"prompt_column/completion_column apply to table or hf: sources, not {source!r}")
    if source in CORPORA:
        return select_split(corpus(source), split, source=source, **options)
    parts = source.split("+")
    if len(parts) > 1 and all(parts) and not Path(source).expanduser().exists():  # a mix: each part split alone
        return [doc for part in parts for doc in load_documents(
            part, split, text_column=text_column, prompt_column=prompt_column, completion_column=completion_column,
            hf_config=hf_config, hf_split=hf_split, streaming=streaming, validation_fraction=validation_fraction,
            test_fraction=test_fraction, split_files=split_files, id_column=id_column,
            prompt_separator=prompt_separator)]
    path = Path(source).expanduser()
    if path.is_dir():
        files = text_files(path)
        chosen = split_indices([i for i, _ in files], split, source=str(path), **options)
        return [Document(id=files[i][0], text=read_text_file(files[i][1])) for i in chosen]
    if not path.exists():
        raise DataError(_not_found(source))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return select_split([Document(id=path.name, text=read_text_file(path))], split, source=str(path), **options)
    if suffix not in _TABLE_READERS:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .txt, "
                        f"{', '.join(TABLE_SUFFIXES)}, a folder of .txt files, or hf:<dataset>")
    columns, rows = _TABLE_READERS[suffix](path)
    docs = _documents_from_rows(rows, columns, cols, path.name, str(path))
    return select_split(docs, split, source=str(path), **options)

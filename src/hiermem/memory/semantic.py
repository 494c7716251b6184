"""Semantic memory: a FAISS vector store kept on disk, with its payloads in SQLite.

Vectors (float32, dim d) are L2-normalised on the way in, and queries too, so the inner product the
index ranks by is the cosine similarity. Index kinds:

- ``flat``: exact search (``IndexFlatIP`` behind an ``IndexIDMap``).
- ``ivf``: ``IndexIVFFlat`` with ``nlist`` lists, ``nprobe`` probed per query; it carries its own ids.
  The coarse quantiser needs training: until the store holds ``39 * nlist`` vectors (FAISS's own
  minimum for a stable k-means) it searches exactly with a flat index (``effective_kind`` says
  "flat"), then trains on a sample of at most ``256 * nlist`` of them and moves everything into the
  IVF. ``train(sample)`` trains earlier on vectors of the caller's choosing.
- ``hnsw``: ``IndexHNSWFlat`` (``M`` links per node, ``ef_construction``, ``ef_search``) behind an
  ``IndexIDMap``. HNSW cannot remove nodes: ``delete`` records tombstones, filtered out of every
  result; ``compact()`` rebuilds the graph without them.

Ids are int64, assigned in order and never reused. Payloads (``tokens``: int32 ids, ``text``,
``source``, ``created_at``, any other JSON-serialisable keys as ``extras``) live in one SQLite file,
so a search reads only the rows of its hits and metadata queries use SQL indexes.

Folder layout (``save``)::

    payloads.sqlite    entries(id, tokens, text, source, created_at, extras, digest), tombstones(id),
                       meta(key, value): format, dim, kind, parameters, index file, vector count
    index-<gen>.faiss  faiss.write_index of the index

``open(folder, mmap=True)`` maps the index file instead of reading it (IVF: ``IO_FLAG_MMAP`` maps
the inverted lists; flat and HNSW: ``IO_FLAG_MMAP_IFC``, zero-copy), so the vectors stay in the
page cache, not in the process's own memory. A mapped index is read-only: ``delete`` then records
tombstones, and the first ``add`` or ``compact`` reads the index into RAM.

Saving is atomic: the index goes to a new file (temp + rename), then one SQLite commit switches the
meta to it; an interrupted save leaves the previous state. Changes to an opened store reach its
folder only on ``save``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import _publish

KINDS = ("flat", "ivf", "hnsw")
FORMAT = "hiermem-semantic-store/1"
DB_NAME = "payloads.sqlite"
MIN_TRAIN_PER_LIST, MAX_TRAIN_PER_LIST = 39, 256
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, tokens BLOB, text TEXT, source TEXT,
                                    created_at REAL, extras TEXT, digest TEXT);
CREATE INDEX IF NOT EXISTS entries_source ON entries(source, created_at);
CREATE INDEX IF NOT EXISTS entries_time ON entries(created_at);
CREATE INDEX IF NOT EXISTS entries_digest ON entries(digest);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
COLUMNS = "id, tokens, text, source, created_at, extras"


def import_faiss():
    """The faiss module, or a ConfigError saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise ConfigError("the semantic store needs FAISS: pip install 'faiss-cpu>=1.8' "
                          "(or pip install 'hiermem[train]')") from e
    return faiss


class Hit(NamedTuple):
    id: int
    score: float  # cosine similarity
    payload: dict


def payload_digest(tokens, text) -> str:
    """Hex digest of a payload's tokens and text (exact-duplicate detection)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"" if tokens is None else np.asarray(tokens, dtype=np.int32).tobytes())
    h.update(b"\x00" + (text or "").encode())
    return h.hexdigest()


def _row_values(p: dict) -> tuple:
    """(tokens blob, text, source, created_at, extras JSON, digest) of payload dict ``p``."""
    if not isinstance(p, dict):
        raise ConfigError(f"a payload must be a dict, got {type(p).__name__}")
    tokens, text = p.get("tokens"), p.get("text")
    blob = None
    if tokens is not None:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ConfigError("payload tokens must be a 1-D sequence of integer token ids")
        if arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
            raise ConfigError("payload token ids must fit in int32")
        blob = arr.astype(np.int32).tobytes()
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"payload text must be a string, got {type(text).__name__}")
    extras = {k: v for k, v in p.items() if k not in ("tokens", "text", "source", "created_at")}
    try:
        extras_json = json.dumps(extras) if extras else None
    except TypeError as e:
        raise ConfigError(f"payload extras must be JSON-serialisable: {e}") from e
    created = float(p["created_at"]) if p.get("created_at") is not None else time.time()
    source = None if p.get("source") is None else str(p["source"])
    return blob, text, source, created, extras_json, payload_digest(tokens, text)


def _payload(row) -> dict:
    """Payload dict of an entries row (id, tokens, text, source, created_at, extras)."""
    _, blob, text, source, created, extras = row
    out = {"tokens": None if blob is None else np.frombuffer(blob, dtype=np.int32).tolist(),
           "text": text, "source": source, "created_at": created}
    if extras:
        out.update(json.loads(extras))
    return out


class SemanticStore:
    """Vectors + payloads with add / search / delete / metadata queries (see the module docstring).

    ``SemanticStore(dim, kind)`` is a new, empty store whose payloads sit in a temporary SQLite
    file until ``save(folder)``; ``SemanticStore.open(folder)`` reopens a saved one.
    """

    def __init__(self, dim: int, kind: str = "flat", nlist: int = 1024, nprobe: int = 16, M: int = 32,
                 ef_construction: int = 40, ef_search: int = 64, seed: int = 0):
        if kind not in KINDS:
            raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        for name, v in (("dim", dim), ("nlist", nlist), ("nprobe", nprobe), ("M", M),
                        ("ef_construction", ef_construction), ("ef_search", ef_search)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"semantic store {name} must be a positive integer, got {v!r}")
        self.faiss = import_faiss()
        self.dim, self.kind = dim, kind
        self.params = dict(nlist=nlist, nprobe=nprobe, M=M, ef_construction=ef_construction, ef_search=ef_search,
                           seed=seed)
        self.index = self._new_index()
        self.trained = kind != "ivf"
        self.mapped = False  # the index is a read-only memory map of self.folder's file
        self.index_dirty = True
        self.tombstones: set[int] = set()
        self.next_id, self.generation, self.folder = 0, 0, None
        self._tmpdir = tempfile.mkdtemp(prefix="hiermem-semantic-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._connect(Path(self._tmpdir) / DB_NAME)

    # --- index construction -------------------------------------------------------------------
    def _new_index(self):
        f, d, p = self.faiss, self.dim, self.params
        if self.kind == "hnsw":
            inner = f.IndexHNSWFlat(d, p["M"], f.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction, inner.hnsw.efSearch = p["ef_construction"], p["ef_search"]
            return f.IndexIDMap(inner)
        return f.IndexIDMap(f.IndexFlatIP(d))  # flat, and ivf until it is trained

    def _apply_search_params(self) -> None:
        if self.kind == "ivf" and self.trained:
            self.index.nprobe = self.params["nprobe"]
        elif self.kind == "hnsw":
            self.faiss.downcast_index(self.index.index).hnsw.efSearch = self.params["ef_search"]

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change IVF's ``nprobe`` or HNSW's ``ef_search`` (saved with the store)."""
        for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
            if v is not None:
                if not isinstance(v, int) or v < 1:
                    raise ConfigError(f"{name} must be a positive integer, got {v!r}")
                self.params[name] = v
        self._apply_search_params()

    @property
    def effective_kind(self) -> str:
        """The index searched now: "flat" for an IVF store that has not been trained yet."""
        return self.kind if self.trained else "flat"

    @property
    def train_threshold(self) -> int:
        return MIN_TRAIN_PER_LIST * self.params["nlist"]

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (n, d) float32, ids (n,) int64) of every vector in an IndexIDMap index."""
        f = self.faiss
        ids = f.vector_to_array(self.index.id_map).astype(np.int64)
        vectors = f.downcast_index(self.index.index).reconstruct_n(0, self.index.ntotal)
        return np.ascontiguousarray(vectors, dtype=np.float32), ids

    def train(self, sample: np.ndarray) -> None:
        """Train the IVF's coarse quantiser on ``sample`` (n, d) (n >= nlist) and move the vectors
        already stored into it. No-op for flat and hnsw, and for a trained IVF."""
        if self.trained:
            return
        f, nlist = self.faiss, self.params["nlist"]
        sample = self._normalised(sample)
        if len(sample) < nlist:
            raise ConfigError(f"IVF training needs at least nlist = {nlist} vectors, got {len(sample)}")
        self._materialise()
        vectors, ids = self._stored()
        ivf = f.IndexIVFFlat(f.IndexFlatIP(self.dim), self.dim, nlist, f.METRIC_INNER_PRODUCT)
        ivf.train(sample)
        if len(ids):
            ivf.add_with_ids(vectors, ids)
        self.index, self.trained, self.index_dirty = ivf, True, True
        self._apply_search_params()

    def _auto_train(self) -> None:
        n = self.index.ntotal
        if not self.trained and n >= self.train_threshold:
            pick = np.random.default_rng(self.params["seed"]).permutation(n)[:MAX_TRAIN_PER_LIST * self.params["nlist"]]
            inner = self.faiss.downcast_index(self.index.index)
            self.train(np.stack([inner.reconstruct(int(i)) for i in np.sort(pick)]))

    def _materialise(self) -> None:
        """Read a memory-mapped index into RAM so that it can change."""
        if self.mapped:
            self.index = self.faiss.read_index(str(self.folder / self._index_name), 0)
            self.mapped = False
            self._apply_search_params()

    # --- vectors in, hits out -------------------------------------------------------------------
    def _normalised(self, x) -> np.ndarray:
        x = np.array(x, dtype=np.float32, copy=True, order="C")
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"vectors must have shape (n, {self.dim}), got {tuple(x.shape)}")
        if not np.isfinite(x).all():
            raise ConfigError("vectors must be finite (found NaN or inf)")
        norms = np.linalg.norm(x, axis=1)
        if len(x) and norms.min() == 0:
            raise ConfigError("zero vectors have no direction and cannot be stored or searched")
        return x / norms[:, None]

    def add(self, vectors, payloads: list[dict]) -> np.ndarray:
        """Store vectors (n, d) with one payload dict each; returns their ids (n,) int64."""
        x = self._normalised(vectors)
        if len(payloads) != len(x):
            raise ConfigError(f"{len(x)} vectors but {len(payloads)} payloads")
        rows = [_row_values(p) for p in payloads]
        ids = np.arange(self.next_id, self.next_id + len(x), dtype=np.int64)
        if not len(x):
            return ids
        self._materialise()
        self._begin()
        self.db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(int(i), *r) for i, r in zip(ids, rows)])
        self.index.add_with_ids(x, ids)
        self.next_id += len(x)
        self.index_dirty = True
        self._auto_train()
        return ids

    def search(self, queries, k: int = 10) -> list[list[Hit]]:
        """The ``k`` nearest live entries of each query (q, d) by cosine: per query a list of
        ``Hit(id, score, payload)``, best first (shorter when fewer entries exist)."""
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        q = self._normalised(queries)
        n = self.index.ntotal
        if n == 0:
            return [[] for _ in range(len(q))]
        fetch = min(n, k + len(self.tombstones))  # enough to still have k after dropping tombstones
        scores, found = self.index.search(q, fetch)  # (q, fetch) each
        keep = [[(int(i), float(s)) for s, i in zip(srow, irow) if i >= 0 and int(i) not in self.tombstones][:k]
                for srow, irow in zip(scores, found)]
        payloads = self._rows(sorted({i for row in keep for i, _ in row}))
        return [[Hit(i, s, payloads[i]) for i, s in row if i in payloads] for row in keep]

    def _rows(self, ids) -> dict[int, dict]:
        out: dict[int, dict] = {}
        ids = [int(i) for i in ids]
        for a in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            part = ids[a:a + 500]
            sql = f"SELECT {COLUMNS} FROM entries WHERE id IN ({','.join('?' * len(part))})"
            out.update({row[0]: _payload(row) for row in self.db.execute(sql, part)})
        return out

    def get(self, ids) -> list[dict | None]:
        """Payloads of ``ids`` (None for an id that is not stored)."""
        rows = self._rows(ids)
        return [rows.get(int(i)) for i in ids]

    def delete(self, ids) -> int:
        """Remove entries (vector and payload); returns how many existed. HNSW and memory-mapped
        indexes keep the vectors as tombstones, never returned, until ``compact()``."""
        ids = sorted({int(i) for i in np.asarray(ids, dtype=np.int64).ravel()})
        live = []
        for a in range(0, len(ids), 500):
            part = ids[a:a + 500]
            live += [r[0] for r in self.db.execute(
                f"SELECT id FROM entries WHERE id IN ({','.join('?' * len(part))}) ORDER BY id", part)]
        if not live:
            return 0
        self._begin()
        for a in range(0, len(live), 500):
            part = live[a:a + 500]
            self.db.execute(f"DELETE FROM entries WHERE id IN ({','.join('?' * len(part))})", part)
        if self.kind == "hnsw" or self.mapped:
            self.tombstones.update(live)
            self.db.executemany("INSERT OR IGNORE INTO tombstones VALUES (?)", [(i,) for i in live])
        else:
            self.index.remove_ids(np.asarray(live, dtype=np.int64))
            self.index_dirty = True
        return len(live)

    def compact(self) -> None:
        """Drop tombstoned vectors from the index (HNSW: rebuilds the graph from the live vectors)."""
        if not self.tombstones:
            return
        self._materialise()
        dead = np.asarray(sorted(self.tombstones), dtype=np.int64)
        if self.kind == "hnsw":
            vectors, ids = self._stored()
            live = ~np.isin(ids, dead)
            self.index = self._new_index()
            if live.any():
                self.index.add_with_ids(vectors[live], ids[live])
        else:
            self.index.remove_ids(dead)
        self.tombstones.clear()
        self._begin()
        self.db.execute("DELETE FROM tombstones")
        self.index_dirty = True
        self._apply_search_params()

    def __len__(self) -> int:
        return self.index.ntotal - len(self.tombstones)

    # --- metadata -------------------------------------------------------------------------------
    def find(self, source: str | None = None, since: float | None = None, until: float | None = None,
             limit: int | None = None) -> list[tuple[int, dict]]:
        """(id, payload) of entries with this ``source`` and ``since <= created_at < until``, oldest first."""
        where, args = [], []
        for cond, v in (("source = ?", source), ("created_at >= ?", since), ("created_at < ?", until)):
            if v is not None:
                where.append(cond), args.append(v)
        sql = f"SELECT {COLUMNS} FROM entries" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at, id" + (" LIMIT ?" if limit is not None else "")
        rows = self.db.execute(sql, args + ([int(limit)] if limit is not None else []))
        return [(row[0], _payload(row)) for row in rows]

    def find_duplicate(self, tokens=None, text: str | None = None) -> int | None:
        """Id of an entry with exactly these tokens and text, or None."""
        row = self.db.execute("SELECT id FROM entries WHERE digest = ? LIMIT 1",
                              (payload_digest(tokens, text),)).fetchone()
        return None if row is None else row[0]

    def info(self) -> dict:
        return {"kind": self.kind, "effective_kind": self.effective_kind, "dim": self.dim, "entries": len(self),
                "tombstones": len(self.tombstones), "mapped": self.mapped, **self.params}

    # --- persistence ----------------------------------------------------------------------------
    def _connect(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.executescript(SCHEMA)

    def _begin(self) -> None:
        """Open the write transaction that holds changes until save() commits them (reads outside
        one take no lasting lock, so other processes can read the folder meanwhile)."""
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")

    def _meta(self, index_name: str) -> dict:
        return {"format": FORMAT, "dim": self.dim, "kind": self.kind, "params": self.params,
                "trained": self.trained, "index_file": index_name, "vectors": self.index.ntotal,
                "next_id": self.next_id, "generation": self.generation}

    @property
    def _index_name(self) -> str:
        return f"index-{self.generation}.faiss"

    def _write_index(self, folder: Path, name: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        os.close(fd)
        try:
            self.faiss.write_index(self.index, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            _publish(tmp, folder / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def save(self, folder: str | Path) -> Path:
        """Write the store to ``folder`` atomically (see the module docstring)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.folder is not None and folder.resolve() == self.folder.resolve():
            old = self._index_name
            if self.index_dirty:
                self.generation += 1
                self._write_index(folder, self._index_name)
            self._begin()
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in self._meta(self._index_name).items()])
            self.db.execute("COMMIT")  # the commit point: meta now names the new index file
            if old != self._index_name:
                (folder / old).unlink(missing_ok=True)
            self.index_dirty = False
            return folder
        self._copy_to(folder)
        return folder

    def _copy_to(self, folder: Path) -> None:
        """Snapshot into another folder: index file, then the rows into a temp database renamed
        over payloads.sqlite (this store keeps working where it is)."""
        gen = self.generation + 1
        name = f"index-{gen}.faiss"
        self._write_index(folder, name)
        fd, tmp = tempfile.mkstemp(prefix=f".{DB_NAME}.", dir=folder)
        os.close(fd)
        try:
            dst = sqlite3.connect(tmp)
            dst.executescript(SCHEMA)
            for table, width in (("entries", 7), ("tombstones", 1)):
                cur = self.db.execute(f"SELECT * FROM {table}")
                while rows := cur.fetchmany(10_000):
                    dst.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * width)})", rows)
            meta = {**self._meta(name), "generation": gen}
            dst.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            dst.commit()
            dst.close()
            _publish(tmp, folder / DB_NAME)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        for stale in folder.glob("index-*.faiss"):
            if stale.name != name:
                stale.unlink(missing_ok=True)

    @classmethod
    def open(cls, folder: str | Path, mmap: bool = True, dim: int | None = None,
             kind: str | None = None) -> SemanticStore:
        """Reopen a saved store; ``mmap`` maps the index instead of reading it into RAM. ``dim`` and
        ``kind``, when given, must match the saved store (CheckpointError otherwise)."""
        folder = Path(folder)
        faiss = import_faiss()
        db_path = folder / DB_NAME
        if not folder.is_dir():
            raise CheckpointError(f"no semantic store at {folder}: the folder does not exist")
        if not db_path.is_file():
            raise CheckpointError(f"{folder} is not a semantic store: {DB_NAME} is missing")
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
            tombstones = {r[0] for r in db.execute("SELECT id FROM tombstones")}
            rows = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            db.close()
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{db_path} is corrupt or not a semantic store ({e}); restore it from a "
                                  "backup or rebuild the store") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{db_path} holds no semantic store of format {FORMAT} (found "
                                  f"{meta.get('format')!r})")
        for name, want in (("dim", dim), ("kind", kind)):
            if want is not None and meta[name] != want:
                raise CheckpointError(f"the semantic store in {folder} has {name} {meta[name]!r}, expected {want!r}")
        index_path = folder / meta["index_file"]
        if not index_path.is_file():
            raise CheckpointError(f"{index_path} is missing: the semantic store in {folder} is incomplete")
        trained = meta["trained"]
        flag = 0
        if mmap:  # zero-copy mapping of flat and HNSW data needs faiss >= 1.9; older ones read them
            flag = faiss.IO_FLAG_MMAP if meta["kind"] == "ivf" and trained else getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
        try:
            index = faiss.read_index(str(index_path), flag)
        except RuntimeError as e:
            raise CheckpointError(f"{index_path} is not a readable FAISS index ({str(e).splitlines()[0]})") from e
        expect = "IndexIVFFlat" if meta["kind"] == "ivf" and trained else "IndexIDMap"
        if type(index).__name__ != expect or index.d != meta["dim"] or index.ntotal != meta["vectors"] \
                or rows + len(tombstones) != meta["vectors"]:
            raise CheckpointError(
                f"the semantic store in {folder} is inconsistent: index {type(index).__name__} with {index.ntotal} "
                f"vectors of dim {index.d}, payload table {rows} rows + {len(tombstones)} tombstones, meta "
                f"{meta['kind']} / {meta['vectors']} / dim {meta['dim']}")
        self = cls(meta["dim"], meta["kind"], **meta["params"])
        self._cleanup()  # the store works on the folder's database, not a temporary one
        self.db.close()
        self.index, self.trained, self.mapped, self.index_dirty = index, trained, flag != 0, False
        self.tombstones, self.next_id, self.generation = tombstones, meta["next_id"], meta["generation"]
        self.folder = folder
        self._connect(db_path)
        self._apply_search_params()
        return self

    def close(self) -> None:
        """Drop unsaved changes and release the files."""
        if self.db is not None:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.db.close()
            self.db = None
        self._cleanup()

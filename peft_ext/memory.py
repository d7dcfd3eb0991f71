"""Controller memory store: adapters as versioned, audited memories in one SQLite database plus adapter folders.

Layout of a store folder::

    store.sqlite          items (every version), heads (the current version of each item), events, FTS5 search index
    adapters/<sha256>/    adapter folders, content-addressed by the hash of their config and weights (shared if equal)
    adapters/.staging/    folders being copied in; never referenced, removed by ``collect_garbage``

Every change runs in one ``BEGIN IMMEDIATE`` transaction (WAL mode), so concurrent writers are serialised and a
killed process leaves either the whole change or none of it. An adapter folder is copied and renamed into place
before its transaction: a kill in between leaves an unreferenced folder, which :meth:`MemoryStore.audit` lists as
``garbage`` (not a problem) and :meth:`MemoryStore.collect_garbage` removes.

Every change is also one event ``{seq, at, kind, item, version, payload, prev_hash}`` with
``hash = sha256(canonical JSON of the event)``, ``prev_hash`` the hash of the event before (a chain). The payloads
hold everything needed to rebuild the items and heads, so :meth:`MemoryStore.audit` replays the log and compares it
with the tables: an edited event breaks the chain, and an edited table no longer matches the replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Protocol

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from .io import atomic_directory, write_json
from .loading import read_adapter_files
from .provenance import read_provenance

GENESIS = "0" * 64
DATABASE = "store.sqlite"
ITEM_FIELDS = ("namespace", "text", "tags", "adapter_sha256", "peft_type", "base_model", "base_fingerprint",
               "metadata", "created_at")
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT NOT NULL, version INTEGER NOT NULL, namespace TEXT NOT NULL, text TEXT NOT NULL, tags TEXT NOT NULL,
    adapter_sha256 TEXT NOT NULL, peft_type TEXT NOT NULL, base_model TEXT, base_fingerprint TEXT NOT NULL,
    metadata TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (id, version));
CREATE TABLE IF NOT EXISTS heads (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, version INTEGER NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, deleted_at TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, at TEXT NOT NULL, kind TEXT NOT NULL, item TEXT NOT NULL, version INTEGER,
    payload TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5(id UNINDEXED, namespace UNINDEXED, text, tags);
"""


class MemoryStoreError(ValueError):
    """A memory-store operation that cannot be done as asked (unknown item, wrong state, invalid adapter)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(event: dict) -> str:
    """SHA-256 of the canonical JSON of an event without its own ``hash``."""
    return hashlib.sha256(_canonical({k: v for k, v in event.items() if k != "hash"}).encode()).hexdigest()


def adapter_sha256(folder: str | Path) -> str:
    """Hash of an adapter folder's ``adapter_config.json`` and ``adapter_model.safetensors`` (what loading reads)."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME):
        digest.update(name.encode())
        with open(Path(folder) / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class Retriever(Protocol):
    """What a retriever provides: the ids of current items ranked for ``query``, best first, with positive scores."""

    def search(self, store: "MemoryStore", query: str, namespace: Optional[str], k: int) -> list[tuple[str, float]]:
        ...


class BM25Retriever:
    """SQLite FTS5 BM25 over item text and tags. Query words are matched with OR; items matching none are no hit."""

    def search(self, store: "MemoryStore", query: str, namespace: Optional[str], k: int) -> list[tuple[str, float]]:
        words = ["".join(ch for ch in word if ch.isalnum()) for word in query.split()]
        expression = " OR ".join(f'"{word}"' for word in words if word)
        if not expression:
            return []
        sql = "SELECT id, -bm25(search) FROM search WHERE search MATCH ?"
        parameters: list = [expression]
        if namespace is not None:
            sql += " AND namespace = ?"
            parameters.append(namespace)
        with store.connect() as connection:
            rows = connection.execute(sql + " ORDER BY bm25(search) LIMIT ?", [*parameters, k]).fetchall()
        return [(item_id, score) for item_id, score in rows if score > 0]


class MemoryStore:
    """A folder holding a memory store (created on first use). Thread- and process-safe; see the module docstring."""

    def __init__(self, path: str | Path, retriever: Optional[Retriever] = None):
        self.path = Path(path)
        self.adapters = self.path / "adapters"
        self.retriever = retriever or BM25Retriever()
        (self.adapters / ".staging").mkdir(parents=True, exist_ok=True)
        with self.connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(SCHEMA)

    # -- plumbing ---------------------------------------------------------------------------------------------------
    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path / DATABASE, timeout=120, isolation_level=None)
        connection.execute("PRAGMA synchronous=FULL")
        try:
            yield connection
        finally:
            connection.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction: all of it commits, or (on any error or kill) none of it."""
        with self.connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    @staticmethod
    def _append_event(connection, kind: str, item: str, version: Optional[int], payload: dict) -> dict:
        last = connection.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        event = {"seq": (last[0] + 1) if last else 1, "at": _now(), "kind": kind, "item": item, "version": version,
                 "payload": payload, "prev_hash": last[1] if last else GENESIS}
        event["hash"] = event_hash(event)
        connection.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (event["seq"], event["at"], kind, item, version, _canonical(payload), event["prev_hash"],
                            event["hash"]))
        return event

    def _stage_adapter(self, folder: str | Path) -> tuple[str, dict]:
        """Copy an adapter folder into the store (content-addressed); return its hash and the saved adapter's facts."""
        folder = Path(folder)
        saved = read_adapter_files(folder)  # safetensors only; refuses missing or corrupt files
        recorded = (read_provenance(folder) or {}).get("fingerprint")
        digest = adapter_sha256(folder)
        target = self.adapters / digest
        if not target.is_dir():
            staging = Path(tempfile.mkdtemp(dir=self.adapters / ".staging"))
            try:
                for entry in folder.iterdir():
                    if entry.is_file():
                        shutil.copy2(entry, staging / entry.name)
                if adapter_sha256(staging) != digest:
                    raise MemoryStoreError(f"{folder} changed while it was being copied into the store")
                try:
                    os.replace(staging, target)
                except OSError:  # another process stored the same adapter first
                    if not target.is_dir():
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return digest, {"peft_type": saved.peft_type, "base_model": saved.config.get("base_model_name_or_path"),
                        "fingerprint": recorded}

    @staticmethod
    def _row(connection, item_id: str, version: int) -> Optional[dict]:
        row = connection.execute(f"SELECT {', '.join(ITEM_FIELDS)} FROM items WHERE id = ? AND version = ?",
                                 (item_id, version)).fetchone()
        if row is None:
            return None
        record = dict(zip(ITEM_FIELDS, row))
        for key in ("tags", "base_fingerprint", "metadata"):
            record[key] = json.loads(record[key])
        return record

    @staticmethod
    def _head(connection, item_id: str) -> dict:
        row = connection.execute("SELECT namespace, version, created_at, updated_at, deleted_at FROM heads "
                                 "WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise MemoryStoreError(f"no memory {item_id!r} in this store")
        return dict(zip(("namespace", "version", "created_at", "updated_at", "deleted_at"), row))

    def _insert_version(self, connection, item_id: str, version: int, record: dict) -> None:
        connection.execute(f"INSERT INTO items (id, version, {', '.join(ITEM_FIELDS)}) VALUES "
                           f"(?, ?, {', '.join('?' * len(ITEM_FIELDS))})",
                           (item_id, version, *[json.dumps(record[k]) if k in ("tags", "base_fingerprint", "metadata")
                                                else record[k] for k in ITEM_FIELDS]))

    def _index(self, connection, item_id: str, record: Optional[dict]) -> None:
        """Point the search index at ``record`` (the current, non-deleted version) or drop the item from it."""
        connection.execute("DELETE FROM search WHERE id = ?", (item_id,))
        if record is not None:
            connection.execute("INSERT INTO search (id, namespace, text, tags) VALUES (?, ?, ?, ?)",
                               (item_id, record["namespace"], record["text"], " ".join(record["tags"])))

    def _check_namespace_base(self, connection, namespace: str, fingerprint: dict, exclude: str = "") -> None:
        rows = connection.execute("SELECT DISTINCT i.base_fingerprint FROM heads h JOIN items i ON i.id = h.id AND "
                                  "i.version = h.version WHERE h.namespace = ? AND h.id != ?", (namespace, exclude))
        others = {row[0] for row in rows} - {json.dumps(fingerprint)}
        if others:
            raise MemoryStoreError(f"namespace {namespace!r} holds memories of another base model; one namespace serves "
                               "one base (use another namespace)")

    def _new_record(self, namespace: str, text: str, tags: Sequence[str], adapter: str | Path,
                    base_fingerprint: Optional[dict], metadata: Optional[dict]) -> dict:
        if not text.strip():
            raise MemoryStoreError("a memory needs a non-empty text (it is what retrieval matches)")
        if not namespace or any(ch.isspace() for ch in namespace):
            raise MemoryStoreError(f"namespace {namespace!r}: use a non-empty name without spaces")
        digest, facts = self._stage_adapter(adapter)
        fingerprint = base_fingerprint or facts["fingerprint"]
        if not fingerprint:
            raise MemoryStoreError(f"{adapter} records no base-model fingerprint (provenance.json); fit it with "
                               "`peft-ext fit`, or pass the base model so its fingerprint can be recorded")
        return {"namespace": namespace, "text": text, "tags": sorted(set(tags)), "adapter_sha256": digest,
                "peft_type": facts["peft_type"], "base_model": facts["base_model"], "base_fingerprint": fingerprint,
                "metadata": dict(metadata or {}), "created_at": _now()}

    # -- operations -------------------------------------------------------------------------------------------------
    def add(self, namespace: str, text: str, adapter: str | Path, tags: Sequence[str] = (),
            metadata: Optional[dict] = None, base_fingerprint: Optional[dict] = None) -> dict:
        """Register an adapter folder as a new memory (version 1); return it."""
        record = self._new_record(namespace, text, tags, adapter, base_fingerprint, metadata)
        item_id = uuid.uuid4().hex
        with self._write() as connection:
            self._check_namespace_base(connection, namespace, record["base_fingerprint"])
            self._insert_version(connection, item_id, 1, record)
            connection.execute("INSERT INTO heads VALUES (?, ?, 1, ?, ?, NULL)",
                               (item_id, namespace, record["created_at"], record["created_at"]))
            self._index(connection, item_id, record)
            self._append_event(connection, "add", item_id, 1, record)
        return self.get(item_id)

    def update(self, item_id: str, text: Optional[str] = None, tags: Optional[Sequence[str]] = None,
               adapter: Optional[str | Path] = None, metadata: Optional[dict] = None,
               base_fingerprint: Optional[dict] = None) -> dict:
        """A new version (the next unused number) from the current one with the given fields replaced."""
        current = self.get(item_id)
        if current["deleted_at"]:
            raise MemoryStoreError(f"memory {item_id} is deleted; restore it before updating")
        if adapter is not None:
            record = self._new_record(current["namespace"], text or current["text"],
                                      current["tags"] if tags is None else tags, adapter, base_fingerprint,
                                      current["metadata"] if metadata is None else metadata)
        else:
            record = {**{k: current[k] for k in ITEM_FIELDS}, "created_at": _now(),
                      **({"text": text} if text else {}), **({"tags": sorted(set(tags))} if tags is not None else {}),
                      **({"metadata": dict(metadata)} if metadata is not None else {})}
        with self._write() as connection:
            head = self._head(connection, item_id)
            self._check_namespace_base(connection, head["namespace"], record["base_fingerprint"], exclude=item_id)
            # versions are never reused: the next number after every version ever made (rollbacks included)
            version = connection.execute("SELECT MAX(version) FROM items WHERE id = ?", (item_id,)).fetchone()[0] + 1
            self._insert_version(connection, item_id, version, record)
            connection.execute("UPDATE heads SET version = ?, updated_at = ? WHERE id = ?",
                               (version, record["created_at"], item_id))
            self._index(connection, item_id, record)
            self._append_event(connection, "update", item_id, version, record)
        return self.get(item_id)

    def _set_deleted(self, item_id: str, deleted: bool) -> dict:
        with self._write() as connection:
            head = self._head(connection, item_id)
            if bool(head["deleted_at"]) == deleted:
                raise MemoryStoreError(f"memory {item_id} is {'already' if deleted else 'not'} deleted")
            event = self._append_event(connection, "delete" if deleted else "restore", item_id, head["version"], {})
            connection.execute("UPDATE heads SET deleted_at = ?, updated_at = ? WHERE id = ?",
                               (event["at"] if deleted else None, event["at"], item_id))
            self._index(connection, item_id, None if deleted else self._row(connection, item_id, head["version"]))
        return self.get(item_id)

    def delete(self, item_id: str) -> dict:
        """Soft delete: the memory leaves search and listings; every version stays and :meth:`restore` brings it back."""
        return self._set_deleted(item_id, True)

    def restore(self, item_id: str) -> dict:
        return self._set_deleted(item_id, False)

    def rollback(self, item_id: str, version: int) -> dict:
        """Make an earlier version current again, after checking its adapter files (exist, hash, readable)."""
        with self.connect() as connection:
            record = self._row(connection, item_id, version)
        if record is None:
            raise MemoryStoreError(f"memory {item_id} has no version {version}")
        self.validate_adapter(record["adapter_sha256"])
        with self._write() as connection:
            head = self._head(connection, item_id)
            if head["version"] == version:
                raise MemoryStoreError(f"version {version} of {item_id} is already current")
            self._check_namespace_base(connection, head["namespace"], record["base_fingerprint"], exclude=item_id)
            event = self._append_event(connection, "rollback", item_id, version, {"from_version": head["version"]})
            connection.execute("UPDATE heads SET version = ?, updated_at = ? WHERE id = ?",
                               (version, event["at"], item_id))
            if not head["deleted_at"]:
                self._index(connection, item_id, record)
        return self.get(item_id)

    def purge(self, item_id: str) -> dict:
        """Remove a memory for good: every version, and the adapter folders no other memory uses. Logged as an event."""
        with self._write() as connection:
            self._head(connection, item_id)
            hashes = {row[0] for row in connection.execute("SELECT adapter_sha256 FROM items WHERE id = ?", (item_id,))}
            connection.execute("DELETE FROM items WHERE id = ?", (item_id,))
            connection.execute("DELETE FROM heads WHERE id = ?", (item_id,))
            self._index(connection, item_id, None)
            event = self._append_event(connection, "purge", item_id, None, {})
            still_used = {row[0] for row in connection.execute("SELECT DISTINCT adapter_sha256 FROM items")}
        for digest in hashes - still_used:  # after the commit: a kill here leaves garbage, never a dangling reference
            shutil.rmtree(self.adapters / digest, ignore_errors=True)
        return {"id": item_id, "purged_at": event["at"]}

    def validate_adapter(self, digest: str) -> Path:
        """The folder of a stored adapter after checking that it exists, hashes to ``digest`` and is readable."""
        folder = self.adapters / digest
        if not folder.is_dir():
            raise MemoryStoreError(f"adapter {digest[:12]} is missing from the store ({folder})")
        if adapter_sha256(folder) != digest:
            raise MemoryStoreError(f"adapter {digest[:12]} does not match its hash: the files were changed")
        read_adapter_files(folder)
        return folder

    # -- reading ----------------------------------------------------------------------------------------------------
    def get(self, item_id: str, version: Optional[int] = None) -> dict:
        """A memory at its current (or the given) version, with its head's timestamps and ``versions``."""
        with self.connect() as connection:
            head = self._head(connection, item_id)
            record = self._row(connection, item_id, version or head["version"])
            versions = [row[0] for row in connection.execute(
                "SELECT version FROM items WHERE id = ? ORDER BY version", (item_id,))]
        if record is None:
            raise MemoryStoreError(f"memory {item_id} has no version {version}")
        return {"id": item_id, "version": version or head["version"], "current_version": head["version"],
                "versions": versions, **record, "adapter": str(self.adapters / record["adapter_sha256"]),
                "updated_at": head["updated_at"], "deleted_at": head["deleted_at"], "created_at": head["created_at"]}

    def list(self, namespace: Optional[str] = None, include_deleted: bool = False) -> list[dict]:
        sql, parameters = "SELECT id FROM heads WHERE 1 = 1", []
        if namespace is not None:
            sql, parameters = sql + " AND namespace = ?", [namespace]
        if not include_deleted:
            sql += " AND deleted_at IS NULL"
        with self.connect() as connection:
            ids = [row[0] for row in connection.execute(sql + " ORDER BY created_at, id", parameters)]
        return [self.get(item_id) for item_id in ids]

    def search(self, query: str, namespace: Optional[str] = None, k: int = 5) -> list[dict]:
        """Current, non-deleted memories ranked for ``query`` by the retriever: ``[{id, score, text, tags, ...}]``."""
        return [{**self.get(item_id), "score": score}
                for item_id, score in self.retriever.search(self, query, namespace, k)]

    def events(self) -> list[dict]:
        with self.connect() as connection:
            rows = connection.execute("SELECT seq, at, kind, item, version, payload, prev_hash, hash FROM events "
                                      "ORDER BY seq").fetchall()
        return [{"seq": seq, "at": at, "kind": kind, "item": item, "version": version, "payload": json.loads(payload),
                 "prev_hash": prev, "hash": digest} for seq, at, kind, item, version, payload, prev, digest in rows]

    # -- audit ------------------------------------------------------------------------------------------------------
    def audit(self) -> dict:
        """Verify the event chain, replay it against the tables, and check files, hashes and namespaces.

        Returns ``{"ok", "problems": [{"code", "id", "message"}], "garbage": [paths], "events", "items"}``; ``ok``
        means no problems (garbage is unreferenced leftovers of interrupted adds or purges, see ``collect_garbage``).
        """
        problems: list[dict] = []

        def problem(code: str, item: str, message: str) -> None:
            problems.append({"code": code, "id": item, "message": message})

        events, previous = self.events(), GENESIS
        for event in events:
            if event["prev_hash"] != previous or event_hash(event) != event["hash"]:
                problem("chain_broken", event["item"], f"event {event['seq']} ({event['kind']}) does not match the "
                        "hash chain: the log was edited")
            previous = event["hash"]
        expected_items, expected_heads = _replay(events)
        with self.connect() as connection:
            heads = {row[0]: {"namespace": row[1], "version": row[2], "deleted": row[3] is not None}
                     for row in connection.execute("SELECT id, namespace, version, deleted_at FROM heads")}
            items = {(row[0], row[1]): self._row(connection, row[0], row[1])
                     for row in connection.execute("SELECT id, version FROM items")}
            indexed = {row[0]: (row[1], row[2]) for row in connection.execute("SELECT id, text, tags FROM search")}
        for key in sorted(set(items) | set(expected_items)):
            if items.get(key) != expected_items.get(key):
                problem("state_mismatch", key[0], f"version {key[1]} differs from the event log")
        for item_id in sorted(set(heads) | set(expected_heads)):
            if heads.get(item_id) != expected_heads.get(item_id):
                problem("state_mismatch", item_id, "the current version or deletion state differs from the event log")
        for item_id, head in heads.items():
            record = items.get((item_id, head["version"]))
            if record is None:
                problem("orphan", item_id, f"current version {head['version']} has no item row")
                continue
            wanted = None if head["deleted"] else (record["text"], " ".join(record["tags"]))
            if indexed.get(item_id) != wanted:
                problem("index_mismatch", item_id, "the search index does not show the current version")
        for item_id in set(indexed) - set(heads):
            problem("orphan", item_id, "the search index holds an item the store does not have")
        for digest in sorted({record["adapter_sha256"] for record in items.values() if record}):
            try:
                self.validate_adapter(digest)
            except ValueError as error:  # MemoryStoreError and unreadable adapter files alike
                users = sorted({key[0] for key, record in items.items() if record and record["adapter_sha256"] == digest})
                for item_id in users:
                    code = "missing_files" if "missing" in str(error) else "hash_mismatch"
                    problem(code, item_id, str(error))
        namespaces: dict[str, set] = {}
        for item_id, head in heads.items():
            record = items.get((item_id, head["version"]))
            if record:
                namespaces.setdefault(head["namespace"], set()).add(json.dumps(record["base_fingerprint"]))
        for namespace, fingerprints in namespaces.items():
            if len(fingerprints) > 1:
                problem("mixed_base_models", namespace, f"namespace {namespace!r} mixes {len(fingerprints)} base models")
        referenced = {record["adapter_sha256"] for record in items.values() if record}
        garbage = [str(p) for p in sorted(self.adapters.iterdir()) if p.name != ".staging" and p.name not in referenced]
        garbage += [str(p) for p in sorted((self.adapters / ".staging").iterdir())]
        return {"ok": not problems, "problems": problems, "garbage": garbage, "events": len(events),
                "items": len(heads)}

    def collect_garbage(self) -> list[str]:
        """Remove what :meth:`audit` lists as garbage (under the write lock, so no add is mid-way)."""
        with self._write():
            garbage = self.audit()["garbage"]
            for path in garbage:
                shutil.rmtree(path, ignore_errors=True)
        return garbage

    # -- export / import --------------------------------------------------------------------------------------------
    def export(self, namespace: str, folder: str | Path, overwrite: bool = False) -> dict:
        """Write a namespace (every version of every memory, deleted ones too) and its adapters to ``folder``."""
        memories = []
        with self.connect() as connection:
            ids = [row[0] for row in connection.execute("SELECT id FROM heads WHERE namespace = ? ORDER BY created_at",
                                                        (namespace,))]
            for item_id in ids:
                head = self._head(connection, item_id)
                versions = {str(v): self._row(connection, item_id, v) for (v,) in connection.execute(
                    "SELECT version FROM items WHERE id = ? ORDER BY version", (item_id,))}
                memories.append({"id": item_id, "head": head, "versions": versions})
        if not memories:
            raise MemoryStoreError(f"namespace {namespace!r} has no memories")
        with atomic_directory(folder, overwrite=overwrite) as temporary:
            for digest in {v["adapter_sha256"] for m in memories for v in m["versions"].values()}:
                shutil.copytree(self.validate_adapter(digest), temporary / "adapters" / digest)
            write_json(temporary / "memories.json", {"namespace": namespace, "exported_at": _now(),
                                                     "memories": memories})
        return {"namespace": namespace, "memories": len(memories), "folder": str(folder)}

    def import_(self, folder: str | Path) -> dict:
        """Add the memories of an exported namespace with their ids, versions and state; existing ids are refused."""
        folder = Path(folder)
        try:
            exported = json.loads((folder / "memories.json").read_text())
        except (OSError, ValueError) as error:
            raise MemoryStoreError(f"{folder} is not an export (memories.json unreadable: {error})") from None
        for memory in exported["memories"]:
            for record in memory["versions"].values():
                source = folder / "adapters" / record["adapter_sha256"]
                if not source.is_dir() or adapter_sha256(source) != record["adapter_sha256"]:
                    raise MemoryStoreError(f"{source}: missing or does not match its hash; nothing was imported")
                self._stage_adapter(source)
        with self._write() as connection:
            for memory in exported["memories"]:
                item_id, head = memory["id"], memory["head"]
                if connection.execute("SELECT 1 FROM heads WHERE id = ?", (item_id,)).fetchone():
                    raise MemoryStoreError(f"memory {item_id} already exists in this store; nothing was imported")
                current = memory["versions"][str(head["version"])]
                self._check_namespace_base(connection, head["namespace"], current["base_fingerprint"])
                for version, record in memory["versions"].items():
                    self._insert_version(connection, item_id, int(version), record)
                connection.execute("INSERT INTO heads VALUES (?, ?, ?, ?, ?, ?)",
                                   (item_id, head["namespace"], head["version"], head["created_at"], head["updated_at"],
                                    head["deleted_at"]))
                self._index(connection, item_id, None if head["deleted_at"] else current)
                self._append_event(connection, "import", item_id, head["version"], memory)
        return {"namespace": exported["namespace"], "memories": len(exported["memories"])}


def _replay(events: list[dict]) -> tuple[dict, dict]:
    """Items ``{(id, version): record}`` and heads ``{id: {namespace, version, deleted}}`` rebuilt from the log.

    Events about an item the log never added (an edited log) are skipped; the comparison with the tables reports it.
    """
    items: dict = {}
    heads: dict = {}
    for event in events:
        item_id, kind, payload = event["item"], event["kind"], event["payload"]
        if kind in ("add", "update"):
            items[(item_id, event["version"])] = payload
            heads.setdefault(item_id, {"namespace": payload["namespace"], "deleted": False})["version"] = event["version"]
        elif kind == "import":
            for version, record in payload["versions"].items():
                items[(item_id, int(version))] = record
            head = payload["head"]
            heads[item_id] = {"namespace": head["namespace"], "version": head["version"],
                              "deleted": head["deleted_at"] is not None}
        elif item_id not in heads:
            continue
        elif kind in ("delete", "restore"):
            heads[item_id]["deleted"] = kind == "delete"
        elif kind == "rollback":
            heads[item_id]["version"] = event["version"]
        elif kind == "purge":
            del heads[item_id]
            items = {key: value for key, value in items.items() if key[0] != item_id}
    return items, heads

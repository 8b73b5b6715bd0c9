"""provenance.hash_ahead / sha256_of: a hash computed ahead is the file's sha256, and is used only
for the same file unchanged."""

from __future__ import annotations

import hashlib
import os

from lora_arith._internal import provenance


def test_hash_ahead_gives_the_files_sha256_and_never_a_stale_one(tmp_path, monkeypatch):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"x" * (3 << 20) + b"tail")
    second.write_bytes(b"y" * 1000)
    provenance.hash_ahead([first, second, tmp_path / "missing.safetensors", first])
    reads = []
    monkeypatch.setattr(provenance, "_hash_file", lambda path: reads.append(path) or "read again")
    assert provenance.sha256_of(first) == hashlib.sha256(first.read_bytes()).hexdigest()
    assert reads == []  # served by the thread that hashed ahead
    second.write_bytes(b"z" * 2000)  # changed after hashing ahead: its hash is computed again
    assert provenance.sha256_of(second) == "read again"
    assert provenance.sha256_of(tmp_path / "c") == "read again"  # never hashed ahead
    stat = first.stat()
    first.write_bytes(b"w" * (3 << 20) + b"tail")  # same size, new content (and mtime)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert provenance.sha256_of(first) == "read again"


def test_a_file_is_hashed_once_while_it_stays_the_same(tmp_path, monkeypatch):
    """``combine`` hashes its inputs each time it runs: a command that makes several mixes of the
    same adapters reads each file once."""
    adapter = tmp_path / "adapter_model.safetensors"
    adapter.write_bytes(b"v" * 5000)
    reads = []
    real = provenance._hash_file
    monkeypatch.setattr(provenance, "_hash_file", lambda path: reads.append(path) or real(path))
    digest = hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert [provenance.sha256_of(adapter) for _ in range(3)] == [digest] * 3
    assert len(reads) == 1
    stat = adapter.stat()
    adapter.write_bytes(b"u" * 5000)  # same size, new content and mtime: read again
    os.utime(adapter, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert provenance.sha256_of(adapter) == hashlib.sha256(b"u" * 5000).hexdigest() and len(reads) == 2

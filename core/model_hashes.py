"""The hashes other tools show for model files (A1111/Forge, model sites, `castbook models inspect`).

- `sha256`: the full file hash (model sites list it; A1111 calls it "sha256").
- `a1111_model_hash`: A1111's short checkpoint hash, the first 10 hex digits of the file's
  sha256 (its infotext `Model hash:` field; A1111 calls it "AutoV2").
- `lora_hash`: the hash of a safetensors file's tensor data after the header (kohya's and
  A1111's "addnet" hash), so editing only the metadata keeps it. A1111 writes its first 12 hex
  digits in `Lora hashes: "name: hash"`.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from core.digests import DIGEST_CHUNK, file_digest

A1111_MODEL_HASH_LENGTH = 10
A1111_LORA_HASH_LENGTH = 12


def sha256(path: Path) -> str:
    return file_digest(path)


def a1111_model_hash(path: Path) -> str:
    return file_digest(path)[:A1111_MODEL_HASH_LENGTH]


def lora_hash(path: Path) -> str:
    """sha256 of a safetensors file's bytes after the 8-byte length and the JSON header."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        (header_length,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + header_length)
        while chunk := fh.read(DIGEST_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def a1111_lora_hash(path: Path) -> str:
    return lora_hash(path)[:A1111_LORA_HASH_LENGTH]

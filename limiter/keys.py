"""Stable client keys: the one definition of how a client id becomes a 64-bit key on the wire.

``client_key(id) = BLAKE2b(utf8(id), digest_size=8, person=b"drl-key1")`` read as a little-endian
unsigned 64-bit integer (0 is mapped to 1: 0 marks an empty slot). Every process and language
computes the same key. For n distinct clients the chance that any two share a key is about
``n**2 / 2**65`` (3e-8 at one million, 3e-4 at 100 million); clients that share a key share a
limit. The key is keyed-hash quality: an adversary cannot cheaply pick an id that collides with
another's. Costs about 0.5 µs, so the request path computes it once per new client only.
"""

from __future__ import annotations

import hashlib

_PERSON = b"drl-key1"


def client_key(client_id: str) -> int:
    """The stable unsigned 64-bit key of ``client_id`` (never 0)."""
    digest = hashlib.blake2b(client_id.encode(), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "little") or 1


def signed(key: int) -> int:
    """``key`` as the int64 with the same bits (how the tables store it)."""
    return key - (1 << 64) if key >= 1 << 63 else key

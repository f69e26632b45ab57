"""Client id rules: a non-empty ``str`` of at most :data:`MAX_CLIENT_ID_LENGTH` characters."""

from __future__ import annotations

#: Longest client id accepted, in characters.
MAX_CLIENT_ID_LENGTH = 256


def invalid_client_id(client_id: object) -> ValueError:
    """The error for a client id that failed the fast check ``0 < len(id) <= MAX``."""
    if not isinstance(client_id, str):
        return ValueError(f"client_id must be a str, got {type(client_id).__name__}")
    if not client_id:
        return ValueError("client_id must not be empty")
    return ValueError(
        f"client_id is {len(client_id)} characters long; the maximum is {MAX_CLIENT_ID_LENGTH}"
    )


def validate_client_id(client_id: object) -> str:
    """Return ``client_id`` if valid, else raise :class:`ValueError` saying what is wrong."""
    if type(client_id) is str and 0 < len(client_id) <= MAX_CLIENT_ID_LENGTH:
        return client_id
    raise invalid_client_id(client_id)

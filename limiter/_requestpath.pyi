from .request import Request

class Decider:
    """``allow_request(client_id, request) -> bool``, compiled (see ``limiter/compiled.py``)."""

    def __init__(self, **fields: object) -> None: ...
    def __call__(self, client_id: str, request: Request) -> bool: ...

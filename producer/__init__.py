"""The server-side streaming agent, its Kafka transports, and the wire format.

``connect(limit, window, bootstrap=..., server_id=...)`` gives an approximate-mode limiter with
its agent running; :mod:`producer.wire` defines every message on the topics.
"""

from .agent import Agent, AgentStats
from .connect import CLIENTS, connect, make_transport
from .transport import GRANTS_TOPIC, USAGE_TOPIC, InProcessBus

__all__ = [
    "CLIENTS",
    "GRANTS_TOPIC",
    "USAGE_TOPIC",
    "Agent",
    "AgentStats",
    "InProcessBus",
    "connect",
    "make_transport",
]

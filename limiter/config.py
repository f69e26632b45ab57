"""Per-client rate-limit configuration: the model, its one parser and serialiser, and services.

>>> from limiter.config import RateLimitConfiguration, StaticConfigurationService
>>> service = StaticConfigurationService({
...     "default": {"rate": "100/minute"},
...     "tiers": {"pro": {"rate": "1000/minute; 4000/hour", "mode": "local"}},
...     "clients": {"bot-7": {"rate": "5/second", "algorithm": "gcra", "burst": 10}},
...     "assignments": {"alice": "pro"},
... })
>>> str(service.get("alice"))
'1000/minute; 4000/hour (sliding_log, local)'
>>> service.explain("nobody").source
'default'

A :class:`RateLimitConfiguration` is what applies to one client: one or more policies (a request
passes only if every one passes), a mode (``local``, ``approximate`` or ``strict``) and cost
rules (tokens per request kind). A :class:`ConfigSnapshot` holds every configuration of a fleet
(default, tiers, per-client overrides, tier assignments) and resolves a client in one dict
lookup: client override, else the client's tier, else the default. A client nobody configured
gets the default, never an error.

One parser and one serialiser (:func:`configuration_from_dict`, :func:`configuration_to_dict`,
:func:`parse_document`, :func:`document_to_dict`) serve the files, the Redis store
(:mod:`limiter.config_redis`) and the ``drl limits`` command line. The file schema is in
docs/configuration.md.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, cast, get_args, runtime_checkable

from .clientid import validate_client_id
from .rate import ALGORITHM_NAMES, DEFAULT_ALGORITHM, Policy, parse_rates

log = logging.getLogger("limiter.config")

Mode = Literal["local", "approximate", "strict"]
#: The modes a configuration may name.
MODES: Final[tuple[str, ...]] = get_args(Mode)

#: Strict mode runs one Redis algorithm for all of a configuration's policies; the local
#: algorithm a policy names maps to it as follows (``fixed_window`` has no strict equivalent).
#: The exact local algorithm (``sliding_log``) and the sliding window map to the exact Redis log.
STRICT_EQUIVALENT: Final[Mapping[str, str]] = MappingProxyType(
    {
        "gcra": "gcra",
        "token_bucket": "gcra",
        "sliding_log": "sliding_window",
        "sliding_window": "sliding_window",
    }
)

#: Tier names: a letter or digit, then letters, digits, ``_ . : -``; at most 64 characters.
TIER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
#: Request kinds in cost rules (an HTTP method, a route name, ...): 1 to 128 characters.
MAX_KIND_LENGTH = 128

#: Where a resolved configuration came from.
Source = Literal["client", "tier", "default", "fallback"]

_ENTRY_KEYS: Final = ("rate", "policies", "algorithm", "burst", "mode", "costs", "default_cost")
_POLICY_KEYS: Final = ("rate", "limit", "window", "burst", "algorithm")
_DOCUMENT_KEYS: Final = ("default", "tiers", "clients", "assignments")


def _whole(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def validate_tier_name(name: object) -> str:
    """Return ``name`` if it is a valid tier name, else raise :class:`ValueError`."""
    if not isinstance(name, str) or not TIER_NAME.match(name):
        raise ValueError(
            f"invalid tier name {name!r}: use 1 to 64 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    return name


def _validate_kind(kind: object) -> str:
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_LENGTH:
        raise ValueError(
            f"a cost rule's request kind must be a non-empty string of at most "
            f"{MAX_KIND_LENGTH} characters, got {kind!r}"
        )
    return kind


# -- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitConfiguration:
    """What applies to one client: ``policies`` (all must pass), a ``mode`` and cost rules.

    - ``policies``: one or more :class:`~limiter.Policy` (limit, window, burst, algorithm).
    - ``mode``: ``local`` (each server decides alone), ``approximate`` (quotas streamed from the
      aggregator; exactly one policy) or ``strict`` (exact, one Redis round trip; every policy's
      algorithm must map to one Redis algorithm, see :data:`STRICT_EQUIVALENT`).
    - ``costs``: ``(kind, tokens)`` pairs, e.g. ``(("POST", 5), ("upload", 20))``: a request of
      that kind costs that many tokens; any other request costs ``default_cost`` (1). Give a
      mapping to :meth:`from_rates`; the field keeps sorted pairs so that the configuration is
      hashable. Every cost must fit the smallest policy capacity, or such requests could never
      pass.

    Everything is validated at construction with a :class:`ValueError` that says what is wrong.
    Instances are immutable, hashable and compare by value.
    """

    policies: tuple[Policy, ...]
    mode: Mode = "local"
    costs: tuple[tuple[str, int], ...] = ()
    default_cost: int = 1
    _cost_index: dict[str, int] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        policies: object = self.policies
        if isinstance(policies, Policy):
            policies = (policies,)
        if isinstance(policies, str) or not isinstance(policies, Sequence):
            raise ValueError(
                f"policies must be a sequence of Policy, got {type(policies).__name__} "
                "(use RateLimitConfiguration.from_rates for a rate string)"
            )
        policies = tuple(policies)
        if not policies:
            raise ValueError("a configuration needs at least one policy")
        for p in policies:
            if not isinstance(p, Policy):
                raise ValueError(f"policies must be Policy objects, got {type(p).__name__}")
        object.__setattr__(self, "policies", policies)
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        object.__setattr__(self, "default_cost", _whole("default_cost", self.default_cost))
        raw_costs: object = self.costs
        if isinstance(raw_costs, Mapping):
            raw_costs = tuple(raw_costs.items())
        if not isinstance(raw_costs, Sequence) or isinstance(raw_costs, str):
            raise ValueError(f"costs must map request kinds to tokens, got {raw_costs!r}")
        index: dict[str, int] = {}
        for pair in raw_costs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"costs must be (kind, tokens) pairs, got {pair!r}")
            kind = _validate_kind(pair[0])
            if kind in index:
                raise ValueError(f"request kind {kind!r} has two cost rules")
            index[kind] = _whole(f"cost of {kind!r}", pair[1])
        object.__setattr__(self, "costs", tuple(sorted(index.items())))
        object.__setattr__(self, "_cost_index", index)
        capacity = self.capacity
        for kind, cost in (*self.costs, ("(default)", self.default_cost)):
            if cost > capacity:
                raise ValueError(
                    f"cost {cost} of {kind} requests is above the smallest policy capacity "
                    f"{capacity}: such requests could never pass"
                )
        if self.mode == "approximate" and len(policies) != 1:
            raise ValueError(
                f"approximate mode takes exactly one policy, got {len(policies)} "
                f"({'; '.join(str(p) for p in policies)})"
            )
        if self.mode == "strict":
            self._check_strict()

    def _check_strict(self) -> None:
        from .strict import _strict_policies  # the strict limiter's own checks, one source

        algorithm = self.strict_algorithm
        _strict_policies(self.policies, algorithm)

    # -- constructors and views ----------------------------------------------------------------

    @classmethod
    def from_rates(
        cls,
        rates: str,
        *,
        mode: Mode = "local",
        algorithm: str | None = None,
        burst: int | None = None,
        costs: Mapping[str, int] | None = None,
        default_cost: int = 1,
    ) -> RateLimitConfiguration:
        """``from_rates("100/minute; 1000/hour", mode="strict", costs={"POST": 5})``."""
        if algorithm is not None and algorithm not in ALGORITHM_NAMES:
            raise ValueError(
                f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHM_NAMES)}"
            )
        policies = _parse_rates(rates, algorithm or _default_algorithm(mode))
        if burst is not None:
            policies = tuple(Policy(p.limit, p.window, burst, p.algorithm) for p in policies)
        return cls(
            policies,
            mode,
            tuple((costs or {}).items()),
            default_cost,
        )

    @property
    def capacity(self) -> int:
        """The most tokens one request may cost: the smallest policy capacity."""
        return min(p.capacity for p in self.policies)

    @property
    def rates(self) -> str:
        """The policies as a rate string, e.g. ``"100/minute; 1000/hour"``."""
        return "; ".join(str(p) for p in self.policies)

    @property
    def strict_algorithm(self) -> str:
        """The Redis algorithm strict mode runs for these policies (``gcra`` or
        ``sliding_window``); :class:`ValueError` if they map to none or to several."""
        names = set()
        for p in self.policies:
            name = STRICT_EQUIVALENT.get(p.algorithm)
            if name is None:
                raise ValueError(
                    f"strict mode has no {p.algorithm} algorithm (policy {p}); use gcra, "
                    "token_bucket, sliding_log or sliding_window"
                )
            names.add(name)
        if len(names) != 1:
            raise ValueError(
                "strict mode runs one algorithm for all of a configuration's policies; "
                f"these map to {' and '.join(sorted(names))}"
            )
        return names.pop()

    @property
    def limiter_key(self) -> tuple[str, tuple[Policy, ...]]:
        """What a limiter is built from (mode and policies): configurations that differ only in
        their cost rules share one limiter, and a cost-only change moves no usage."""
        return (self.mode, self.policies)

    @property
    def horizon(self) -> float:
        """Seconds after which usage under these policies no longer limits anything: the longest
        window, or refill time of a bucket larger than its limit."""
        return max(p.window * max(1.0, p.capacity / p.limit) for p in self.policies)

    def cost_for(self, kind: str | None) -> int:
        """Tokens a request of ``kind`` costs (``default_cost`` for None or an unnamed kind)."""
        if kind is None:
            return self.default_cost
        return self._cost_index.get(kind, self.default_cost)

    def __str__(self) -> str:
        algorithms = sorted({p.algorithm for p in self.policies})
        text = f"{self.rates} ({', '.join(algorithms)}, {self.mode})"
        bursts = [str(p.burst) for p in self.policies if p.burst is not None]
        if bursts:
            text += f" burst {'/'.join(bursts)}"
        if self.costs or self.default_cost != 1:
            rules = ", ".join(f"{k}={v}" for k, v in self.costs)
            text += f" costs {{{rules}{', ' if rules else ''}default={self.default_cost}}}"
        return text


def _default_algorithm(mode: str) -> str:
    """What a rate names when no algorithm is given: the exact local algorithm, except in
    approximate mode (leases, no local cap: ``gcra``, as ``RateLimiter`` does)."""
    return "gcra" if mode == "approximate" else DEFAULT_ALGORITHM


# -- one parser and one serialiser ---------------------------------------------------------------


def _as_table(where: str, value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a table (mapping), got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ValueError(f"{where}: keys must be strings, got {key!r}")
    return cast("Mapping[str, object]", value)


def _check_keys(where: str, table: Mapping[str, object], allowed: Sequence[str]) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(allowed)}")


def _window(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: window must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: window must be finite seconds > 0, got {value!r}")
    return float(value)


_NEGATIVE_RATE = re.compile(r"^\s*-\s*\d+(?:\.\d+)?\s*(?:/|per\b)", re.IGNORECASE)


def _parse_rates(text: str, algorithm: str) -> tuple[Policy, ...]:
    """:func:`~limiter.parse_rates`, with a plain message for a negative limit."""
    m = _NEGATIVE_RATE.match(text)
    if m is not None:
        raise ValueError(f"negative limit in rate {text!r}: a limit must be a whole number > 0")
    return parse_rates(text, algorithm=algorithm)


def _policy_from(where: str, item: object, algorithm: str) -> tuple[Policy, ...]:
    """One item of ``policies``: a rate string, or a table with ``rate`` or ``limit``+``window``."""
    try:
        return _policy_items(where, item, algorithm)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None


def _policy_items(where: str, item: object, algorithm: str) -> tuple[Policy, ...]:
    if isinstance(item, str):
        return _parse_rates(item, algorithm)
    table = _as_table(where, item)
    _check_keys(where, table, _POLICY_KEYS)
    algo = table.get("algorithm", algorithm)
    if not isinstance(algo, str):
        raise ValueError(f"{where}: algorithm must be a string, got {algo!r}")
    burst = table.get("burst")
    if "rate" in table:
        if "limit" in table or "window" in table:
            raise ValueError(f"{where}: give either rate or limit and window, not both")
        rate = table["rate"]
        if not isinstance(rate, str):
            raise ValueError(f"{where}: rate must be a string such as '100/minute', got {rate!r}")
        parsed = _parse_rates(rate, algo)
    elif "limit" in table and "window" in table:
        parsed = (Policy(cast("int", table["limit"]), _window(where, table["window"]), None, algo),)
    else:
        raise ValueError(f"{where}: give rate (e.g. '100/minute'), or limit and window (seconds)")
    if burst is not None:
        parsed = tuple(Policy(p.limit, p.window, cast("int", burst), p.algorithm) for p in parsed)
    return parsed


def configuration_from_dict(
    data: Mapping[str, object], *, where: str = "configuration"
) -> RateLimitConfiguration:
    """Parse one configuration (a file table, a stored JSON object, CLI options).

    Keys: ``rate`` (``"100/minute; 1000/hour"``) or ``policies`` (a list of rate strings or of
    tables with ``rate`` or ``limit`` + ``window`` seconds, and optional ``burst`` and
    ``algorithm``); ``algorithm`` and ``burst`` (apply to every policy of ``rate``; ``algorithm``
    is also the default of ``policies`` items); ``mode``; ``costs`` (kind -> tokens);
    ``default_cost``. Errors are :class:`ValueError` naming ``where`` (if not empty) and what
    is wrong.
    """
    try:
        table = _as_table(where, data)
        _check_keys(where, table, _ENTRY_KEYS)
        mode = table.get("mode", "local")
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        algorithm = table.get("algorithm", _default_algorithm(mode))
        if not isinstance(algorithm, str) or algorithm not in ALGORITHM_NAMES:
            raise ValueError(
                f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHM_NAMES)}"
            )
        has_rate, has_policies = "rate" in table, "policies" in table
        if has_rate == has_policies:
            raise ValueError("give exactly one of rate (e.g. '100/minute') or policies")
        if has_rate:
            item: dict[str, object] = {"rate": table["rate"]}
            if not isinstance(table["rate"], str):
                raise ValueError(
                    f"rate must be a string such as '100/minute', got {table['rate']!r}"
                )
            if table.get("burst") is not None:
                item["burst"] = table["burst"]
            policies = _policy_from(where, item, algorithm)
        else:
            if "burst" in table:
                raise ValueError("with policies, give burst in each policy")
            items = table["policies"]
            if isinstance(items, str | bytes) or not isinstance(items, Sequence) or not items:
                raise ValueError("policies must be a non-empty list")
            policies = tuple(
                p
                for i, it in enumerate(items)
                for p in _policy_from(f"{where}.policies[{i}]", it, algorithm)
            )
        costs = _as_table(f"{where}.costs", table.get("costs", {}))
        default_cost = table.get("default_cost", 1)
        return RateLimitConfiguration(
            policies,
            cast("Mode", mode),
            tuple(costs.items()),  # type: ignore[arg-type]  # validated by the constructor
            cast("int", default_cost),
        )
    except ValueError as exc:
        message = str(exc)
        if where and not message.startswith(where):
            message = f"{where}: {message}"
        raise ValueError(message) from None


def configuration_to_dict(config: RateLimitConfiguration) -> dict[str, Any]:
    """The canonical form: explicit policies (limit, window seconds, algorithm, burst), mode,
    and cost rules when not the defaults. :func:`configuration_from_dict` reads it back equal."""
    policies: list[dict[str, Any]] = []
    for p in config.policies:
        item: dict[str, Any] = {
            "limit": p.limit,
            "window": int(p.window) if p.window.is_integer() else p.window,
            "algorithm": p.algorithm,
        }
        if p.burst is not None:
            item["burst"] = p.burst
        policies.append(item)
    out: dict[str, Any] = {"policies": policies, "mode": config.mode}
    if config.costs:
        out["costs"] = dict(config.costs)
    if config.default_cost != 1:
        out["default_cost"] = config.default_cost
    return out


def configuration_to_json(config: RateLimitConfiguration) -> str:
    """Canonical compact JSON (sorted keys): how the Redis store keeps a configuration."""
    return json.dumps(configuration_to_dict(config), sort_keys=True, separators=(",", ":"))


def configuration_from_json(
    text: str | bytes, *, where: str = "configuration"
) -> RateLimitConfiguration:
    """Parse :func:`configuration_to_json` output (or any JSON object of the entry schema)."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from None
    return configuration_from_dict(data, where=where)


@dataclass(frozen=True, slots=True)
class ConfigDocument:
    """Every configuration of a fleet, validated: what a file holds and the Redis store keeps.

    ``default`` (None: not given), ``tiers`` (name -> configuration), ``clients`` (client id ->
    override), ``assignments`` (client id -> tier name; every tier exists in ``tiers``, or in
    the ``known_tiers`` given to :func:`parse_document`).
    """

    default: RateLimitConfiguration | None = None
    tiers: Mapping[str, RateLimitConfiguration] = field(default_factory=dict)
    clients: Mapping[str, RateLimitConfiguration] = field(default_factory=dict)
    assignments: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("tiers", "clients", "assignments"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


def parse_document(
    data: object,
    *,
    known_tiers: Collection[str] = (),
    require_default: bool = False,
    where: str = "",
) -> ConfigDocument:
    """Validate a whole document (file schema: ``default``, ``tiers``, ``clients``,
    ``assignments``); raise one :class:`ValueError` naming the first problem's location.

    An assignment must name a tier of the document or one of ``known_tiers``.
    """
    prefix = f"{where}: " if where else ""
    try:
        table = _as_table("document", data)
        _check_keys("document", table, _DOCUMENT_KEYS)
        default = None
        if "default" in table:
            default = configuration_from_dict(
                _as_table("default", table["default"]), where="default"
            )
        elif require_default:
            raise ValueError(
                'no default configuration: add a [default] table, e.g. rate = "100/minute"'
            )
        tiers: dict[str, RateLimitConfiguration] = {}
        for name, entry in _as_table("tiers", table.get("tiers", {})).items():
            validate_tier_name(name)
            tiers[name] = configuration_from_dict(
                _as_table(f"tiers.{name}", entry), where=f"tiers.{name}"
            )
        clients: dict[str, RateLimitConfiguration] = {}
        for client, entry in _as_table("clients", table.get("clients", {})).items():
            _client_id(f"clients.{client}", client)
            clients[client] = configuration_from_dict(
                _as_table(f"clients.{client}", entry), where=f"clients.{client}"
            )
        assignments: dict[str, str] = {}
        for client, tier in _as_table("assignments", table.get("assignments", {})).items():
            _client_id(f"assignments.{client}", client)
            if not isinstance(tier, str):
                raise ValueError(f"assignments.{client}: the tier must be a name, got {tier!r}")
            if tier not in tiers and tier not in known_tiers:
                raise ValueError(
                    f"assignments.{client}: unknown tier {tier!r}; "
                    f"the tiers are {', '.join(sorted({*tiers, *known_tiers})) or '(none)'}"
                )
            assignments[client] = tier
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None
    return ConfigDocument(default, tiers, clients, assignments)


def _client_id(where: str, client: object) -> str:
    try:
        return validate_client_id(client)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def document_to_dict(document: ConfigDocument) -> dict[str, Any]:
    """The canonical file form of ``document`` (JSON-ready); :func:`parse_document` reads it
    back equal."""
    out: dict[str, Any] = {}
    if document.default is not None:
        out["default"] = configuration_to_dict(document.default)
    out["tiers"] = {k: configuration_to_dict(v) for k, v in sorted(document.tiers.items())}
    out["clients"] = {k: configuration_to_dict(v) for k, v in sorted(document.clients.items())}
    out["assignments"] = dict(sorted(document.assignments.items()))
    return out


def read_document_file(path: str | Path) -> object:
    """The raw data of a ``.toml``, ``.json``, ``.yaml`` or ``.yml`` file (not yet validated)."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            with p.open("rb") as f:
                return tomllib.load(f)
        if suffix == ".json":
            return json.loads(p.read_text("utf-8"))
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover - pyyaml is a test dependency
                raise ValueError(f"{p}: reading YAML needs PyYAML (pip install pyyaml)") from None
            return yaml.safe_load(p.read_text("utf-8"))
    except OSError as exc:
        raise ValueError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not valid {suffix[1:].upper()}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError, without importing yaml for the check
        if type(exc).__module__.startswith("yaml"):
            raise ValueError(f"{p}: not valid YAML: {exc}") from None
        raise
    raise ValueError(f"{p}: unknown file type {suffix or '(none)'!r}; use .toml, .json or .yaml")


def load_document(
    path: str | Path, *, known_tiers: Collection[str] = (), require_default: bool = False
) -> ConfigDocument:
    """Read and validate a configuration file; :class:`ValueError` names the file and place."""
    return parse_document(
        read_document_file(path),
        known_tiers=known_tiers,
        require_default=require_default,
        where=str(path),
    )


# -- the resolved view ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolution:
    """A resolved configuration and where it came from (``tier`` names the tier, if any)."""

    config: RateLimitConfiguration
    source: Source
    tier: str | None = None


class ConfigSnapshot:
    """An immutable, versioned view of a :class:`ConfigDocument`, resolved for the request path.

    ``resolve(client_id)`` is one dict lookup: every configured client's configuration (override,
    else tier) is precomputed; anyone else gets ``default`` (the document's, else ``fallback``).
    """

    __slots__ = ("default", "default_source", "document", "resolved", "version")

    def __init__(
        self,
        document: ConfigDocument,
        version: int,
        fallback: RateLimitConfiguration | None = None,
    ) -> None:
        self.document = document
        self.version = version
        if document.default is not None:
            self.default: RateLimitConfiguration = document.default
            self.default_source: Source = "default"
        elif fallback is not None:
            self.default = fallback
            self.default_source = "fallback"
        else:
            raise ValueError("a snapshot needs a default configuration or a fallback")
        tiers = document.tiers
        resolved = {c: tiers[t] for c, t in document.assignments.items() if t in tiers}
        resolved.update(document.clients)
        #: client id -> configuration, for every client with an override or a tier
        self.resolved: Mapping[str, RateLimitConfiguration] = resolved

    def resolve(self, client_id: str) -> RateLimitConfiguration:
        """The configuration of ``client_id``: override, else tier, else default."""
        return self.resolved.get(client_id, self.default)

    def explain(self, client_id: str) -> Resolution:
        """:meth:`resolve`, and where the answer came from."""
        doc = self.document
        config = doc.clients.get(client_id)
        if config is not None:
            return Resolution(config, "client", doc.assignments.get(client_id))
        tier = doc.assignments.get(client_id)
        if tier is not None and tier in doc.tiers:
            return Resolution(doc.tiers[tier], "tier", tier)
        return Resolution(self.default, self.default_source)

    def configurations(self) -> set[RateLimitConfiguration]:
        """Every distinct configuration a client may resolve to."""
        return {self.default, *self.document.tiers.values(), *self.document.clients.values()}

    def __repr__(self) -> str:
        d = self.document
        return (
            f"ConfigSnapshot(version={self.version}, tiers={len(d.tiers)}, "
            f"clients={len(d.clients)}, assignments={len(d.assignments)})"
        )


# -- services ------------------------------------------------------------------------------------

#: ``callback(old, new)``: called after a new snapshot is in place (from the thread that
#: installed it: the Redis watcher, or the caller of ``replace``). Exceptions are logged.
ChangeCallback = Callable[[ConfigSnapshot, ConfigSnapshot], object]


@runtime_checkable
class ConfigurationService(Protocol):
    """Where rate-limit configurations come from. ``get`` is served from memory (a snapshot),
    never from the network, and never raises for an unknown client: it gets the default."""

    @property
    def version(self) -> int:
        """The version of the snapshot being served (grows with every change)."""
        ...

    def get(self, client_id: str) -> RateLimitConfiguration:
        """The configuration of ``client_id``: override, else tier, else default."""
        ...

    def explain(self, client_id: str) -> Resolution:
        """:meth:`get` and where it came from."""
        ...

    def snapshot(self) -> ConfigSnapshot:
        """The snapshot being served."""
        ...

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(old, new)`` after every change; returns the unsubscribe function."""
        ...


class SnapshotHolder:
    """The part every service shares: the current snapshot, and subscribers told of changes."""

    def __init__(self, snapshot: ConfigSnapshot) -> None:
        self._snapshot = snapshot
        self._subscribers: list[ChangeCallback] = []
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._snapshot.version

    def get(self, client_id: str) -> RateLimitConfiguration:
        return self._snapshot.resolved.get(client_id, self._snapshot.default)

    def explain(self, client_id: str) -> Resolution:
        return self._snapshot.explain(client_id)

    def snapshot(self) -> ConfigSnapshot:
        return self._snapshot

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        if not callable(callback):
            raise ValueError("callback must be callable as callback(old, new)")
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _install(self, new: ConfigSnapshot) -> None:
        """Swap in ``new`` (one reference assignment: readers never see half a change), then
        tell the subscribers."""
        with self._lock:
            old = self._snapshot
            self._snapshot = new
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(old, new)
            except Exception:
                log.exception("configuration subscriber %r failed", callback)


class StaticConfigurationService(SnapshotHolder):
    """Configurations from a dict (the file schema) or a file (TOML, JSON, YAML).

    ``StaticConfigurationService({"default": {"rate": "100/minute"}, ...})`` or
    ``StaticConfigurationService.from_file("limits.toml")``. A default is required (or a
    ``fallback``). :meth:`replace` and :meth:`reload` install a new version in process (an app
    that reloads its file on SIGHUP, tests); subscribers are told.
    """

    def __init__(
        self,
        document: ConfigDocument | Mapping[str, object],
        *,
        fallback: RateLimitConfiguration | None = None,
        path: str | Path | None = None,
    ) -> None:
        self.fallback = fallback
        self.path = Path(path) if path is not None else None
        self._replace_lock = threading.Lock()
        super().__init__(self._snapshot_of(document, 1))

    @classmethod
    def from_file(
        cls, path: str | Path, *, fallback: RateLimitConfiguration | None = None
    ) -> StaticConfigurationService:
        """Load ``path`` (``.toml``, ``.json``, ``.yaml``); :class:`ValueError` if invalid."""
        return cls(
            load_document(path, require_default=fallback is None), fallback=fallback, path=path
        )

    def _snapshot_of(
        self, document: ConfigDocument | Mapping[str, object], version: int
    ) -> ConfigSnapshot:
        if not isinstance(document, ConfigDocument):
            document = parse_document(document, require_default=self.fallback is None)
        elif document.default is None and self.fallback is None:
            raise ValueError("no default configuration (and no fallback)")
        for client, tier in document.assignments.items():
            if tier not in document.tiers:
                raise ValueError(f"assignments.{client}: unknown tier {tier!r}")
        return ConfigSnapshot(document, version, self.fallback)

    def replace(self, document: ConfigDocument | Mapping[str, object]) -> int:
        """Validate and install ``document`` as the next version (all or nothing); return it."""
        with self._replace_lock:  # one replacement at a time: versions never repeat
            version = self._snapshot.version + 1
            self._install(self._snapshot_of(document, version))
            return version

    def reload(self) -> int:
        """Read the file again (:meth:`replace` with its content); the file must be valid."""
        if self.path is None:
            raise ValueError("this service was not loaded from a file")
        return self.replace(load_document(self.path, require_default=self.fallback is None))


#: Served by a store that holds no default yet (set one with ``drl limits default-set``):
#: 100 requests per second per client, decided locally. Pass ``fallback=`` to choose another.
FALLBACK_CONFIGURATION: Final = RateLimitConfiguration.from_rates("100/second")

"""``drl limits``: read and change the fleet's rate-limit configuration in Redis.

::

    drl limits set CLIENT RATE [--mode M] [--algorithm A] [--burst N] [--cost KIND=N] ...
    drl limits get CLIENT [--json]          # the resolved configuration and where it came from
    drl limits list [--json]
    drl limits delete CLIENT                # override and tier assignment: back to the default
    drl limits tier-set TIER RATE [options]
    drl limits tier-delete TIER             # refused while clients are assigned to it
    drl limits tier-assign CLIENT TIER      # refused for an unknown tier
    drl limits tier-unassign CLIENT
    drl limits default-set RATE [options]
    drl limits import FILE [--merge] [--dry-run]   # .toml, .json, .yaml: all or nothing
    drl limits export                       # the store as JSON (the file schema)

Every change is validated before anything is written, then applied in one Redis transaction
that bumps the version and publishes it: app servers and aggregators follow within about a
second (:mod:`limiter.config_redis`). Exit status: 0 done, 2 bad input (one line on stderr,
nothing written), 1 Redis failed. RATE is a rate string: ``"100/minute"``,
``"10 per 5 seconds"``, several joined by ``;``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from limiter.config import (
    ConfigDocument,
    RateLimitConfiguration,
    configuration_from_dict,
    configuration_to_dict,
    document_to_dict,
    load_document,
)
from limiter.config_redis import DEFAULT_PREFIX, RedisConfigurationService

#: Exit status of a command refused for bad input (argparse's own usage errors exit 2 too).
EXIT_BAD_INPUT = 2
#: Exit status when Redis failed.
EXIT_REDIS = 1
#: Commands that write nothing.
READ_ONLY = frozenset({"get", "list", "export"})


class BadInput(ValueError):
    """Input the command refuses; the message is one line."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit status 2; arguments such as ``-5/minute`` are values
    (then refused with a clear message), not unknown options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _one_line_error(parser: argparse.ArgumentParser) -> Callable[[str], NoReturn]:
    """``parser.error`` as :meth:`_Parser.error` (for the parser ``drl`` creates)."""

    def error(message: str) -> NoReturn:
        parser.exit(EXIT_BAD_INPUT, f"{parser.prog}: error: {message}\n")

    return error


def default_prefix() -> str:
    return os.environ.get("DRL_CONFIG_PREFIX") or DEFAULT_PREFIX


def safe_url(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def add_parser(sub: Any, default_redis_url: str) -> None:
    """Register ``drl limits ...`` on the ``drl`` subcommands ``sub``."""
    limits = sub.add_parser(
        "limits",
        help="read and change per-client rate limits, tiers and the default (in Redis)",
        description="Per-client rate-limit configuration in Redis. Exit status: 0 done, 2 bad "
        "input (nothing written), 1 Redis failed.",
    )
    limits.error = _one_line_error(limits)
    limits_sub = limits.add_subparsers(
        dest="limits_command", required=True, parser_class=_Parser, metavar="COMMAND"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=default_redis_url,
        help="Redis URL; AUTH as redis://user:password@host:port/db, TLS as rediss:// "
        "(env DRL_REDIS_URL; default %(default)s)",
    )
    common.add_argument(
        "--prefix",
        default=default_prefix(),
        help="key prefix of the store (env DRL_CONFIG_PREFIX; default %(default)s)",
    )
    common.add_argument(
        "--timeout", type=float, default=5.0, help="Redis timeout, seconds (default %(default)s)"
    )
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--mode", default="local", help="local, approximate or strict (default %(default)s)"
    )
    options.add_argument(
        "--algorithm",
        help="sliding_log (default), token_bucket, gcra, fixed_window, sliding_window",
    )
    options.add_argument("--burst", help="bucket capacity (token_bucket and gcra)")
    options.add_argument(
        "--cost",
        action="append",
        default=[],
        metavar="KIND=TOKENS",
        help="tokens a request of KIND costs (repeatable), e.g. --cost POST=5",
    )
    options.add_argument("--default-cost", help="tokens any other request costs (default 1)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")

    def command(name: str, help: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = limits_sub.add_parser(
            name, help=help, parents=[common, *parents]
        )
        p.set_defaults(func=cmd_limits)
        return p

    p = command("set", "set a client's own limits (they win over its tier)", options)
    p.add_argument("client")
    p.add_argument("rate", help='e.g. "100/minute" or "10/second; 1000/hour"')
    p = command("get", "print a client's resolved limits and where they come from", as_json)
    p.add_argument("client")
    command("list", "print the default, tiers, overrides and assignments", as_json)
    p = command("delete", "remove a client's override and tier assignment")
    p.add_argument("client")
    p = command("tier-set", "create or change a tier", options)
    p.add_argument("tier")
    p.add_argument("rate")
    p = command("tier-delete", "remove a tier no client is assigned to")
    p.add_argument("tier")
    p = command("tier-assign", "put a client in a tier")
    p.add_argument("client")
    p.add_argument("tier")
    p = command("tier-unassign", "take a client out of its tier")
    p.add_argument("client")
    p = command("default-set", "set the default for every client not configured", options)
    p.add_argument("rate")
    p = command("import", "write a whole file (.toml, .json, .yaml): all of it or nothing")
    p.add_argument("file")
    p.add_argument(
        "--merge",
        action="store_true",
        help="add or overwrite the file's entries and keep the others (default: the store "
        "becomes exactly the file)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate only; write nothing")
    command("export", "print the store as JSON in the file schema")


def configuration_from_args(args: argparse.Namespace) -> RateLimitConfiguration:
    """The configuration the options of ``set``/``tier-set``/``default-set`` describe."""
    entry: dict[str, object] = {"rate": args.rate, "mode": args.mode}
    if args.algorithm is not None:
        entry["algorithm"] = args.algorithm
    if args.burst is not None:
        entry["burst"] = _whole("--burst", args.burst)
    costs: dict[str, object] = {}
    for rule in args.cost:
        kind, sep, tokens = rule.partition("=")
        if not sep or not kind:
            raise BadInput(f"--cost expects KIND=TOKENS, e.g. POST=5; got {rule!r}")
        if kind in costs:
            raise BadInput(f"--cost names {kind!r} twice")
        costs[kind] = _whole(f"--cost {kind}", tokens)
    if costs:
        entry["costs"] = costs
    if args.default_cost is not None:
        entry["default_cost"] = _whole("--default-cost", args.default_cost)
    return configuration_from_dict(entry, where="")


def _whole(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"{name} must be a whole number, got {text!r}") from None


def _service(args: argparse.Namespace) -> RedisConfigurationService:
    return RedisConfigurationService(
        args.redis_url, args.prefix, watch=False, load=False, timeout=args.timeout
    )


def _line(config: RateLimitConfiguration) -> str:
    return str(config)


def cmd_limits(args: argparse.Namespace) -> int:
    """Run one ``drl limits`` command; the exit status."""
    import redis

    name = f"drl limits {args.limits_command}"
    try:
        with _service(args) as store:
            return _run(args, store)
    except ValueError as exc:  # BadInput and every validation error of the model
        print(f"{name}: error: {exc}".replace("\n", " "), file=sys.stderr)
        return EXIT_BAD_INPUT
    except (redis.RedisError, OSError) as exc:
        outcome = "" if args.limits_command in READ_ONLY else ", nothing changed"
        print(
            f"{name}: Redis at {safe_url(args.redis_url)} failed{outcome}: "
            f"{type(exc).__name__}: {exc}".replace("\n", " "),
            file=sys.stderr,
        )
        return EXIT_REDIS


def _run(args: argparse.Namespace, store: RedisConfigurationService) -> int:
    command = args.limits_command
    if command == "set":
        config = configuration_from_args(args)
        version = store.set_client(args.client, config)
        print(f"client {args.client}: {_line(config)} (version {version})")
    elif command == "tier-set":
        config = configuration_from_args(args)
        version = store.set_tier(args.tier, config)
        print(f"tier {args.tier}: {_line(config)} (version {version})")
    elif command == "default-set":
        config = configuration_from_args(args)
        version = store.set_default(config)
        print(f"default: {_line(config)} (version {version})")
    elif command == "delete":
        changed = store.delete_client(args.client)
        if changed is None:
            print(f"client {args.client}: nothing stored; it already gets the default")
        else:
            print(f"client {args.client}: removed; it gets the default (version {changed})")
    elif command == "tier-delete":
        changed = store.delete_tier(args.tier)
        if changed is None:
            raise BadInput(f"no tier {args.tier!r}")
        print(f"tier {args.tier}: removed (version {changed})")
    elif command == "tier-assign":
        version = store.assign(args.client, args.tier)
        print(f"client {args.client}: in tier {args.tier} (version {version})")
    elif command == "tier-unassign":
        changed = store.unassign(args.client)
        if changed is None:
            print(f"client {args.client}: was in no tier")
        else:
            print(f"client {args.client}: in no tier (version {changed})")
    elif command == "get":
        _get(args, store)
    elif command == "list":
        _list(args, store)
    elif command == "export":
        version, document = store.read()
        print(json.dumps({"version": version, **document_to_dict(document)}, indent=2))
    elif command == "import":
        _import(args, store)
    else:  # pragma: no cover - argparse allows only the commands above
        raise BadInput(f"unknown command {command!r}")
    return 0


def _get(args: argparse.Namespace, store: RedisConfigurationService) -> None:
    from limiter.clientid import validate_client_id
    from limiter.config import ConfigSnapshot

    client = validate_client_id(args.client)
    version, document = store.read()
    resolution = ConfigSnapshot(document, version, store.fallback).explain(client)
    if resolution.source == "client":
        origin = "its own override"
        if resolution.tier is not None:
            origin += f" (also assigned to tier {resolution.tier!r})"
    elif resolution.source == "tier":
        origin = f"tier {resolution.tier!r}"
    elif resolution.source == "default":
        origin = "the default"
    else:
        origin = "the built-in fallback (the store has no default: use default-set)"
    if args.json:
        out = {
            "client": client,
            "version": version,
            "source": resolution.source,
            "tier": resolution.tier,
            "configuration": configuration_to_dict(resolution.config),
        }
        print(json.dumps(out, indent=2))
        return
    print(f"client {client}: {_line(resolution.config)}")
    print(f"  from {origin}; store version {version}")


def _list(args: argparse.Namespace, store: RedisConfigurationService) -> None:
    version, document = store.read()
    if args.json:
        print(json.dumps({"version": version, **document_to_dict(document)}, indent=2))
        return
    print(f"version {version}")
    default = document.default
    print(f"default: {_line(default) if default else '(none: servers use their fallback)'}")
    for name, config in sorted(document.tiers.items()):
        members = sum(1 for t in document.assignments.values() if t == name)
        print(f"tier {name}: {_line(config)} [{members} client(s)]")
    for client, config in sorted(document.clients.items()):
        print(f"client {client}: {_line(config)}")
    for client, tier in sorted(document.assignments.items()):
        print(f"assign {client} -> {tier}")


def _import(args: argparse.Namespace, store: RedisConfigurationService) -> None:
    known: set[str] = set()
    if args.merge:
        _, stored = store.read()
        known = set(stored.tiers)
    document: ConfigDocument = load_document(args.file, known_tiers=known)
    summary = (
        f"{'default, ' if document.default is not None else ''}{len(document.tiers)} tier(s), "
        f"{len(document.clients)} client override(s), {len(document.assignments)} assignment(s)"
    )
    if args.dry_run:
        print(f"{args.file}: valid: {summary}; nothing written (--dry-run)")
        return
    version = store.import_document(document, replace=not args.merge)
    how = "merged into" if args.merge else "replaced"
    print(f"{args.file}: {summary} {how} the store (version {version})")

"""The configuration model without Redis: validation, the one parser/serialiser, files, the
hierarchy (client override -> tier -> default), and property tests against a naive reference."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limiter import Policy
from limiter.config import (
    FALLBACK_CONFIGURATION,
    ConfigDocument,
    ConfigSnapshot,
    ConfigurationService,
    Mode,
    RateLimitConfiguration,
    StaticConfigurationService,
    configuration_from_dict,
    configuration_from_json,
    configuration_to_dict,
    configuration_to_json,
    document_to_dict,
    load_document,
    parse_document,
)

DOC: dict[str, Any] = {
    "default": {"rate": "100/minute"},
    "tiers": {
        "free": {"rate": "10/minute"},
        "pro": {"rate": "1000/minute; 4000/hour", "costs": {"POST": 5}},
        "enterprise": {"rate": "50/second", "algorithm": "gcra", "burst": 200, "mode": "strict"},
    },
    "clients": {"bot-7": {"rate": "5/second", "algorithm": "token_bucket", "burst": 10}},
    "assignments": {"alice": "pro", "bob": "free", "bot-7": "enterprise"},
}


# -- the model -------------------------------------------------------------------------------------


def test_configuration_from_rates_and_views() -> None:
    c = RateLimitConfiguration.from_rates(
        "10/second; 1000/hour", mode="strict", algorithm="gcra", burst=20, costs={"POST": 5}
    )
    assert c.policies == (Policy(10, 1.0, 20, "gcra"), Policy(1000, 3600.0, 20, "gcra"))
    assert c.mode == "strict" and c.strict_algorithm == "gcra"
    assert c.cost_for("POST") == 5 and c.cost_for("GET") == 1 and c.cost_for(None) == 1
    assert c.capacity == 20
    assert c.rates == "10/second; 1000/hour"
    assert "burst 20/20" in str(c) and "POST=5" in str(c)
    # frozen, hashable, equal by value (cost rules included)
    assert c == RateLimitConfiguration.from_rates(
        "10/second; 1000/hour", mode="strict", algorithm="gcra", burst=20, costs={"POST": 5}
    )
    assert len({c, c}) == 1
    with pytest.raises(AttributeError):
        c.mode = "local"  # type: ignore[misc]
    # limiter_key ignores cost rules: a cost-only change keeps the same limiter
    other = RateLimitConfiguration(c.policies, "strict", (("POST", 2),))
    assert other != c and other.limiter_key == c.limiter_key


def test_defaults_follow_the_mode() -> None:
    assert RateLimitConfiguration.from_rates("5/s").policies[0].algorithm == "sliding_log"
    approx = RateLimitConfiguration.from_rates("50000/minute", mode="approximate")
    assert approx.policies[0].algorithm == "gcra"  # no local cap in approximate mode
    strict = RateLimitConfiguration.from_rates("5/s; 100/hour", mode="strict")
    assert strict.strict_algorithm == "sliding_window"  # the exact Redis log


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"rate": "-5/minute"}, "negative limit in rate '-5/minute'"),
        ({"policies": [{"limit": -5, "window": 60}]}, "limit must be > 0, got -5"),
        ({"policies": [{"limit": 0, "window": 60}]}, "limit must be > 0, got 0"),
        ({"policies": [{"limit": 5, "window": -1}]}, "window must be finite seconds > 0"),
        ({"rate": "5/minute", "algorithm": "magic"}, "unknown algorithm 'magic'"),
        ({"rate": "5 / fortnight"}, "unknown unit 'fortnight'"),
        ({"rate": "five/minute"}, "malformed rate 'five/minute'"),
        ({"rate": ""}, "no rate given"),
        ({"rate": 5}, "rate must be a string"),
        ({"rate": "5/s", "mode": "fast"}, "unknown mode 'fast'"),
        ({"rate": "5/s", "burst": 3}, "burst applies to token_bucket and gcra only"),
        ({"rate": "5/s", "algorithm": "gcra", "burst": -3}, "burst must be > 0"),
        ({"rate": "5/s", "costs": {"POST": 6}}, "cost 6 of POST requests is above"),
        ({"rate": "5/s", "costs": {"POST": 0}}, "cost of 'POST' must be >= 1"),
        ({"rate": "5/s", "default_cost": 0}, "default_cost must be >= 1"),
        ({"rate": "5/s", "colour": "red"}, "unknown key 'colour'"),
        ({}, "give exactly one of rate"),
        ({"rate": "5/s", "policies": ["5/s"]}, "give exactly one of rate"),
        ({"rate": "1/s; 2/min", "mode": "approximate"}, "approximate mode takes exactly one"),
        ({"rate": "5/s", "mode": "strict", "algorithm": "fixed_window"}, "strict mode has no"),
        (
            {"policies": [{"rate": "5/s", "algorithm": "gcra"}, "9/minute"], "mode": "strict"},
            "strict mode runs one algorithm",
        ),
        ({"rate": "5000/minute"}, "sliding_log keeps one timestamp per token"),
    ],
)
def test_bad_entries_are_refused_with_a_clear_message(
    entry: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=r"^tiers\.x(\.policies\[0\])?: ") as info:
        configuration_from_dict(entry, where="tiers.x")
    assert message in str(info.value)


def test_entry_forms_and_canonical_round_trip() -> None:
    forms: list[dict[str, object]] = [
        {"rate": "10/second; 100/minute", "algorithm": "gcra", "burst": 15},
        {
            "policies": [
                {"rate": "10/second", "burst": 15},
                {"limit": 100, "window": 60, "burst": 15},
            ],
            "algorithm": "gcra",
        },
    ]
    configs = [configuration_from_dict(f) for f in forms]
    assert configs[0] == configs[1]
    c = configs[0]
    assert configuration_to_dict(c) == {
        "policies": [
            {"limit": 10, "window": 1, "algorithm": "gcra", "burst": 15},
            {"limit": 100, "window": 60, "algorithm": "gcra", "burst": 15},
        ],
        "mode": "local",
    }
    assert configuration_from_dict(configuration_to_dict(c)) == c
    assert configuration_from_json(configuration_to_json(c)) == c
    with pytest.raises(ValueError, match="not valid JSON"):
        configuration_from_json(b"{nope")


# -- documents and files -----------------------------------------------------------------------


def test_document_validation_names_the_place() -> None:
    with pytest.raises(ValueError, match=r"^f.toml: assignments.carol: unknown tier 'gold'"):
        parse_document({**DOC, "assignments": {"carol": "gold"}}, where="f.toml")
    with pytest.raises(ValueError, match=r"tiers.pro: unknown algorithm 'magic'"):
        parse_document({"tiers": {"pro": {"rate": "5/s", "algorithm": "magic"}}})
    with pytest.raises(ValueError, match=r"invalid tier name 'no spaces'"):
        parse_document({"tiers": {"no spaces": {"rate": "5/s"}}})
    with pytest.raises(ValueError, match=r"unknown key 'tier'; the keys are default, tiers"):
        parse_document({"tier": {}})
    with pytest.raises(ValueError, match=r"no default configuration"):
        parse_document({"tiers": {}}, require_default=True)
    with pytest.raises(ValueError, match=r"clients.*client_id must not be empty"):
        parse_document({"clients": {"": {"rate": "5/s"}}})
    # a tier known elsewhere (the store, when merging) is accepted
    doc = parse_document({"assignments": {"carol": "gold"}}, known_tiers={"gold"})
    assert doc.assignments == {"carol": "gold"}


def test_document_round_trip() -> None:
    doc = parse_document(DOC)
    again = parse_document(json.loads(json.dumps(document_to_dict(doc))))
    assert again == doc


TOML = """
    [default]
    rate = "100/minute"

    [tiers.free]
    rate = "10/minute"

    [tiers.pro]
    rate = "1000/minute; 4000/hour"
    costs = { POST = 5 }

    [tiers.enterprise]
    policies = [ { rate = "50/second", burst = 200 }, { limit = 1000000, window = 86400 } ]
    algorithm = "gcra"
    mode = "strict"

    [clients.bot-7]
    rate = "5/second"
    algorithm = "token_bucket"
    burst = 10

    [assignments]
    alice = "pro"
    bob = "free"
    bot-7 = "enterprise"
"""


def test_static_service_from_toml_json_yaml(tmp_path: Path) -> None:
    toml_file = tmp_path / "limits.toml"
    toml_file.write_text(textwrap.dedent(TOML))
    from_toml = StaticConfigurationService.from_file(toml_file)
    doc = from_toml.snapshot().document
    json_file = tmp_path / "limits.json"
    json_file.write_text(json.dumps(document_to_dict(doc)))
    yaml = pytest.importorskip("yaml")
    yaml_file = tmp_path / "limits.yaml"
    yaml_file.write_text(yaml.safe_dump(document_to_dict(doc)))
    for service in (
        from_toml,
        StaticConfigurationService.from_file(json_file),
        StaticConfigurationService.from_file(yaml_file),
    ):
        assert isinstance(service, ConfigurationService)
        assert service.snapshot().document == doc
        assert service.get("alice").rates == "1000/minute; 4000/hour"
        assert service.get("alice").cost_for("POST") == 5
        assert service.get("bot-7").policies == (Policy(5, 1.0, 10, "token_bucket"),)
        assert service.explain("bot-7").source == "client"
        assert service.explain("bot-7").tier == "enterprise"
        enterprise = service.get("carol-not-assigned")
        assert enterprise.rates == "100/minute"
        assert doc.tiers["enterprise"].policies[1] == Policy(1_000_000, 86400.0, None, "gcra")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.toml", "[default\nrate = 1", "not valid TOML"),
        ("bad.json", "{", "not valid JSON"),
        ("bad.yaml", "default: [unclosed", "not valid YAML"),
        ("limits.ini", "[default]", "unknown file type '.ini'"),
        ("nodefault.toml", '[tiers.free]\nrate = "1/s"', "no default configuration"),
        ("neg.toml", '[default]\nrate = "-1/s"', "default: negative limit"),
        (
            "tier.toml",
            '[default]\nrate = "1/s"\n[assignments]\nalice = "gold"',
            "assignments.alice: unknown tier 'gold'",
        ),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}: ") as info:
        StaticConfigurationService.from_file(path)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        load_document(tmp_path / "missing.toml")


def test_static_service_resolution_replace_and_subscribers() -> None:
    service = StaticConfigurationService(DOC)
    assert service.version == 1
    assert service.get("alice").rates == "1000/minute; 4000/hour"  # tier
    assert service.get("bob").rates == "10/minute"  # tier
    assert service.get("bot-7").rates == "5/second"  # override beats its tier
    assert service.get("nobody").rates == "100/minute"  # unknown: the default, no error
    assert service.explain("nobody").source == "default"
    seen: list[tuple[int, int]] = []
    unsubscribe = service.subscribe(lambda old, new: seen.append((old.version, new.version)))
    # alice moves from pro to free
    version = service.replace({**DOC, "assignments": {**DOC["assignments"], "alice": "free"}})
    assert version == 2 and seen == [(1, 2)]
    assert service.get("alice").rates == "10/minute"
    assert service.explain("alice").tier == "free"
    # a bad replacement changes nothing and tells nobody
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        service.replace({**DOC, "assignments": {"alice": "gold"}})
    assert service.version == 2 and seen == [(1, 2)]
    unsubscribe()
    service.replace(DOC)
    assert seen == [(1, 2)]
    # a subscriber that raises does not stop the change
    service.subscribe(lambda old, new: 1 / 0)
    assert service.replace(DOC) == 4


def test_fallback_when_no_default() -> None:
    service = StaticConfigurationService({"tiers": {}}, fallback=FALLBACK_CONFIGURATION)
    assert service.get("x") == FALLBACK_CONFIGURATION
    assert service.explain("x").source == "fallback"
    with pytest.raises(ValueError, match="no default configuration"):
        StaticConfigurationService({"tiers": {}})


# -- property tests against a naive reference ---------------------------------------------------

RATES = ["1/second", "5/second", "10/minute", "100/minute", "1000/hour", "7 per 3 seconds"]
configs = st.builds(
    lambda rate, mode, cost: RateLimitConfiguration.from_rates(
        rate, mode=mode, costs={"POST": cost}
    ),
    st.sampled_from(RATES),
    st.sampled_from(["local", "strict", "approximate"]),
    st.integers(1, 1),
)
TIERS = ["free", "pro", "enterprise", "t-4"]
CLIENTS = ["alice", "bob", "carol", "dave", "erin", "frank"]


@st.composite
def documents(draw: st.DrawFn) -> ConfigDocument:
    tiers = draw(st.dictionaries(st.sampled_from(TIERS), configs, max_size=4))
    clients = draw(st.dictionaries(st.sampled_from(CLIENTS), configs, max_size=4))
    assignments = (
        draw(st.dictionaries(st.sampled_from(CLIENTS), st.sampled_from(sorted(tiers)), max_size=6))
        if tiers
        else {}
    )
    default = draw(st.none() | configs)
    return ConfigDocument(default, tiers, clients, assignments)


def reference(doc: ConfigDocument, fallback: RateLimitConfiguration, client: str) -> object:
    """The hierarchy written the obvious way."""
    if client in doc.clients:
        return doc.clients[client]
    if client in doc.assignments:
        return doc.tiers[doc.assignments[client]]
    if doc.default is not None:
        return doc.default
    return fallback


@settings(max_examples=300, deadline=None)
@given(documents(), configs, st.lists(st.sampled_from([*CLIENTS, "unknown", "x" * 256])))
def test_resolution_matches_reference(
    doc: ConfigDocument, fallback: RateLimitConfiguration, queries: list[str]
) -> None:
    snapshot = ConfigSnapshot(doc, 1, fallback)
    for client in [*CLIENTS, *queries]:
        expected = reference(doc, fallback, client)
        assert snapshot.resolve(client) == expected
        how = snapshot.explain(client)
        assert how.config == expected
        if client in doc.clients:
            assert how.source == "client"
        elif client in doc.assignments:
            assert (how.source, how.tier) == ("tier", doc.assignments[client])
        else:
            assert how.source == ("default" if doc.default is not None else "fallback")


@settings(max_examples=200, deadline=None)
@given(documents())
def test_document_serialisation_round_trips(doc: ConfigDocument) -> None:
    data = json.loads(json.dumps(document_to_dict(doc)))
    assert parse_document(data) == doc


@st.composite
def any_configuration(draw: st.DrawFn) -> RateLimitConfiguration:
    """Configurations over the whole model: any algorithm, burst, window, costs, mode."""
    n = draw(st.integers(1, 3))
    algorithm = draw(st.sampled_from(["sliding_log", "token_bucket", "gcra", "sliding_window"]))
    policies = []
    for _ in range(n):
        limit = draw(st.integers(1, 4096))
        window = draw(st.sampled_from([0.5, 1.0, 2.5, 60.0, 3600.0, 86400.0]))
        burst = (
            draw(st.none() | st.integers(1, 5000))
            if algorithm in ("token_bucket", "gcra")
            else None
        )
        policies.append(Policy(limit, window, burst, algorithm))
    mode = draw(st.sampled_from(["local", "strict"] + (["approximate"] if n == 1 else [])))
    capacity = min(p.capacity for p in policies)
    costs = draw(
        st.dictionaries(st.sampled_from(["GET", "POST", "upload"]), st.integers(1, capacity))
    )
    return RateLimitConfiguration(
        tuple(policies), cast("Mode", mode), tuple(costs.items()), draw(st.integers(1, capacity))
    )


@settings(max_examples=300, deadline=None)
@given(any_configuration())
def test_configuration_serialisation_round_trips(config: RateLimitConfiguration) -> None:
    assert configuration_from_dict(configuration_to_dict(config)) == config
    assert configuration_from_json(configuration_to_json(config)) == config

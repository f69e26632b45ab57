"""``drl limits``: commands against real Redis, exit status 2 and one line for bad input with
nothing written, 1 when Redis fails, and an all-or-nothing import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from aggregator.cli import main

from .test_redis_store import store_dump

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


class Drl:
    """Runs ``drl limits ...`` in process against one store."""

    def __init__(self, url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url, self.prefix, self.capsys = url, prefix, capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            code = main(["limits", *args, "--redis-url", self.url, "--prefix", self.prefix])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def drl(redis_url: str, store_prefix: str, capsys: pytest.CaptureFixture[str]) -> Drl:
    return Drl(redis_url, store_prefix, capsys)


def test_commands(drl: Drl) -> None:
    assert drl("list")[0] == 0
    code, out, _ = drl("default-set", "100/minute")
    assert code == 0 and "version 1" in out
    assert drl("tier-set", "free", "10/minute")[0] == 0
    code, out, _ = drl("tier-set", "pro", "1000/minute; 4000/hour", "--cost", "POST=5")
    assert code == 0 and "POST=5" in out
    assert drl("tier-assign", "alice", "pro")[0] == 0
    code, out, _ = drl("set", "bot-7", "5/second", "--algorithm", "gcra", "--burst", "10")
    assert code == 0 and "burst 10" in out
    code, out, _ = drl("set", "payments", "10 per 5 seconds", "--mode", "strict")
    assert code == 0 and "(sliding_log, strict)" in out

    code, out, _ = drl("get", "alice")
    assert code == 0 and "1000/minute; 4000/hour" in out and "from tier 'pro'" in out
    code, out, _ = drl("get", "bot-7")
    assert code == 0 and "from its own override" in out
    code, out, _ = drl("get", "stranger")
    assert code == 0 and "100/minute" in out and "from the default" in out
    code, out, _ = drl("get", "alice", "--json")
    got = json.loads(out)
    assert (got["source"], got["tier"], got["version"]) == ("tier", "pro", 6)
    assert got["configuration"]["costs"] == {"POST": 5}

    code, out, _ = drl("list")
    assert code == 0
    assert "tier pro: 1000/minute; 4000/hour" in out and "[1 client(s)]" in out
    assert "assign alice -> pro" in out and "client bot-7: 5/second" in out
    listed = json.loads(drl("list", "--json")[1])
    assert listed["version"] == 6 and listed["assignments"] == {"alice": "pro"}

    # move alice between tiers, then take her out
    assert drl("tier-assign", "alice", "free")[0] == 0
    assert "from tier 'free'" in drl("get", "alice")[1]
    assert drl("tier-unassign", "alice")[0] == 0
    assert "from the default" in drl("get", "alice")[1]
    assert drl("delete", "bot-7")[0] == 0
    code, out, _ = drl("delete", "bot-7")
    assert code == 0 and "nothing stored" in out
    assert drl("tier-delete", "free")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["set", "alice", "-5/minute"], "negative limit in rate '-5/minute'"),
        (["set", "alice", "0/minute"], "limit must be > 0"),
        (["set", "alice", "5/minute", "--algorithm", "magic"], "unknown algorithm 'magic'"),
        (["set", "alice", "5 per fortnight"], "unknown unit 'fortnight'"),
        (["set", "alice", "lots"], "malformed rate 'lots'"),
        (["set", "alice", "5/s", "--mode", "fast"], "unknown mode 'fast'"),
        (["set", "alice", "5/s", "--burst", "ten"], "--burst must be a whole number"),
        (["set", "alice", "5/s", "--algorithm", "gcra", "--burst", "-1"], "burst must be > 0"),
        (["set", "alice", "5/s", "--burst", "3"], "burst applies to token_bucket and gcra"),
        (["set", "alice", "5/s", "--cost", "POST"], "--cost expects KIND=TOKENS"),
        (["set", "alice", "5/s", "--cost", "POST=9"], "cost 9 of POST requests is above"),
        (["set", "", "5/s"], "client_id must not be empty"),
        (["tier-set", "bad name", "5/s"], "invalid tier name 'bad name'"),
        (["tier-assign", "alice", "gold"], "unknown tier 'gold'; the tiers are free"),
        (["tier-delete", "free"], "tier 'free' has 1 assigned client(s) (bob)"),
        (["tier-delete", "gold"], "no tier 'gold'"),
        (["default-set", "1/s; 2/min", "--mode", "approximate"], "exactly one policy"),
        (["set", "alice"], "the following arguments are required: rate"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    drl: Drl, redis_client: redis.Redis, store_prefix: str, args: list[str], message: str
) -> None:
    assert drl("default-set", "100/minute")[0] == 0
    assert drl("tier-set", "free", "10/minute")[0] == 0
    assert drl("tier-assign", "bob", "free")[0] == 0
    before = store_dump(redis_client, store_prefix)
    code, out, err = drl(*args)
    assert code == 2, (out, err)
    assert message in err
    assert err.count("\n") == 1 and err.startswith("drl limits"), err
    assert out == ""
    assert store_dump(redis_client, store_prefix) == before


def test_redis_down_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["set", "alice", "5/s"], ["list"]):
        code = main(["limits", *args, "--redis-url", "redis://:pw@127.0.0.1:1/0"])
        _, err = capsys.readouterr()
        assert code == 1
        assert "Redis at redis://:***@127.0.0.1:1/0 failed" in err and "pw" not in err
        assert ("nothing changed" in err) == (args[0] == "set")


GOOD = """
    [default]
    rate = "100/minute"

    [tiers.free]
    rate = "10/minute"

    [tiers.pro]
    rate = "1000/minute"
    costs = { POST = 5 }

    [clients.bot-7]
    rate = "5/second"
    algorithm = "gcra"
    burst = 10

    [assignments]
    alice = "pro"
    bob = "free"
"""


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("syntax.toml", GOOD + "\n[clients.x\n", "not valid TOML"),
        ("tier.toml", GOOD + '    carol = "gold"\n', "assignments.carol: unknown tier 'gold'"),
        (
            "negative.toml",
            GOOD + '\n    [clients.zed]\n    rate = "-3/second"\n',
            "clients.zed: negative limit",
        ),
        (
            "algorithm.toml",
            GOOD.replace('algorithm = "gcra"', 'algorithm = "quantum"'),
            "clients.bot-7: unknown algorithm 'quantum'",
        ),
        ("rate.json", json.dumps({"tiers": {"t": {"rate": "ten/minute"}}}), "malformed rate"),
        ("limits.ini", "x", "unknown file type"),
    ],
)
def test_import_is_all_or_nothing(
    drl: Drl,
    redis_client: redis.Redis,
    store_prefix: str,
    tmp_path: Path,
    name: str,
    content: str,
    message: str,
) -> None:
    assert drl("default-set", "7/minute")[0] == 0
    assert drl("tier-set", "old", "3/minute")[0] == 0
    assert drl("tier-assign", "dave", "old")[0] == 0
    before = store_dump(redis_client, store_prefix)
    bad = tmp_path / name
    bad.write_text(textwrap.dedent(content))
    for extra in ([], ["--merge"], ["--dry-run"]):
        code, _out, err = drl("import", str(bad), *extra)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert store_dump(redis_client, store_prefix) == before


def test_import_replace_merge_and_dry_run(drl: Drl, tmp_path: Path) -> None:
    assert drl("tier-set", "old", "3/minute")[0] == 0
    assert drl("tier-assign", "dave", "old")[0] == 0
    good = tmp_path / "limits.toml"
    good.write_text(textwrap.dedent(GOOD))
    code, out, _ = drl("import", str(good), "--dry-run")
    assert code == 0 and "nothing written" in out
    assert "assign dave -> old" in drl("list")[1]
    code, out, _ = drl("import", str(good))
    assert code == 0 and "replaced the store (version 3)" in out
    listed = drl("list")[1]
    assert "dave" not in listed and "tier old" not in listed
    assert "from tier 'pro'" in drl("get", "alice")[1]
    # merge: a file that assigns to a stored tier and adds a client
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps({"clients": {"erin": {"rate": "2/s"}}, "assignments": {"dave": "pro"}})
    )
    code, out, _ = drl("import", str(extra), "--merge")
    assert code == 0 and "merged into" in out
    exported = json.loads(drl("export")[1])
    assert exported["assignments"] == {"alice": "pro", "bob": "free", "dave": "pro"}
    assert set(exported["clients"]) == {"bot-7", "erin"}
    # the export is a valid import file: replacing with it changes nothing but the version
    again = tmp_path / "again.json"
    del exported["version"]
    again.write_text(json.dumps(exported))
    assert drl("import", str(again))[0] == 0
    after = json.loads(drl("export")[1])
    assert after.pop("version") == 5 and after == exported


def test_the_drl_command_line_exit_status(redis_url: str, store_prefix: str) -> None:
    env = {**os.environ, "DRL_REDIS_URL": redis_url, "DRL_CONFIG_PREFIX": store_prefix}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aggregator.cli", "limits", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
        )

    bad = run("set", "alice", "-5/minute")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (
        "drl limits set: error: negative limit in rate '-5/minute': a limit must be a whole "
        "number > 0\n"
    )
    ok = run("set", "alice", "5/minute")
    assert ok.returncode == 0 and "client alice: 5/minute" in ok.stdout
    assert "from its own override" in run("get", "alice").stdout

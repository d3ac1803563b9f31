"""API keys: constant-time comparison, where keys come from, and the rule for serving without them."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from medvlp.serve import auth
from medvlp.serve.auth import KeyRing, check_auth_config, is_loopback, load_keys

KEYS = ["k" * 16 + "-first", "k" * 16 + "-second", "k" * 16 + "-third"]


def test_every_key_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:  # the real function, counted
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    ring = KeyRing(KEYS)
    for presented, expected in ((KEYS[0], True), (KEYS[2], True), ("k" * 16 + "-fourth", False), ("", False)):
        calls.clear()
        assert ring.check(presented) is expected
        assert len(calls) == len(KEYS)  # no early exit: every key compared, matched or not
        assert all(len(a) == len(b) == 32 for a, b in calls)  # fixed-length digests: no length leak
        assert not presented or all(presented.encode() not in a for a, _ in calls)  # digests, never the raw key


def test_keys_from_the_environment_and_a_file(tmp_path: Path) -> None:
    f = tmp_path / "keys.txt"
    f.write_text(f"# clinic A\n{KEYS[1]}\n\n  {KEYS[2]}  # rotated 2024\n")
    assert load_keys(f, {"MEDVLP_API_KEYS": f" {KEYS[0]} ,,"}) == KEYS
    assert load_keys(None, {}) == []
    with pytest.raises(ValueError, match="shorter than 16") as err:
        load_keys(None, {"MEDVLP_API_KEYS": "short-secret"})
    assert "short-secret" not in str(err.value)  # a key is never echoed, not even a bad one
    with pytest.raises(ValueError, match="cannot read"):
        load_keys(tmp_path / "absent.txt", {})


def test_serving_without_keys_is_explicit_and_local_only() -> None:
    check_auth_config(KEYS, no_auth=False, host="0.0.0.0")
    check_auth_config([], no_auth=True, host="127.0.0.1")
    check_auth_config([], no_auth=True, host="::1")
    with pytest.raises(ValueError, match="no API key configured"):
        check_auth_config([], no_auth=False, host="127.0.0.1")
    with pytest.raises(ValueError, match="loopback"):
        check_auth_config([], no_auth=True, host="0.0.0.0")
    with pytest.raises(ValueError, match="pick one"):
        check_auth_config(KEYS, no_auth=True, host="127.0.0.1")
    assert is_loopback("localhost") and is_loopback("127.0.0.9") and not is_loopback("10.0.0.1")
    assert KeyRing([]).check(None) and not KeyRing(KEYS).check(None)


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "no API key configured"), (["--no-auth", "--host", "0.0.0.0"], "loopback")],
)
def test_the_cli_refuses_to_start_unsafely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    from typer.testing import CliRunner

    from medvlp.cli import app

    monkeypatch.delenv("MEDVLP_API_KEYS", raising=False)
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())

"""The team key's file format and proofs (device_agent.auth): no network."""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

import pytest

from device_agent.auth import (AUTH_HELLO, AUTH_PROOF, TRACKER_AUTH, TRACKER_FAIL, TRACKER_SUCCESS, AuthRefused,
                               ReplayCache, SessionGate, TeamKey, TeamKeyError, TeamKeyMissing,
                               authenticate_to_tracker, create_team_key, direct_token, is_nonce, load_or_create_team_key,
                               load_team_key, new_nonce, peer_proof, proof_matches, session_proof, tracker_proof)

SKEW_SEC = 600.0


def key_of(text: str = "") -> TeamKey:
    return TeamKey(secrets.token_bytes(32), Path(text or "k"))


def test_a_created_key_is_private_and_loads_back(tmp_path):
    path = tmp_path / "conf" / "team.key"
    created = create_team_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert len(text.strip()) == 64 and text.endswith("\n")
    loaded = load_team_key(path)
    assert loaded.secret == created.secret and loaded.fingerprint == created.fingerprint
    assert created.secret.hex() not in repr(created)
    again, made = load_or_create_team_key(path)
    assert not made and again.secret == created.secret


def test_load_or_create_makes_one_when_missing(tmp_path):
    key, made = load_or_create_team_key(tmp_path / "team.key")
    assert made and len(key.secret) == 32


@pytest.mark.parametrize("content, mode, message", [
    ("ab" * 32 + "\n", 0o644, "open to every user"),
    ("not a key\n", 0o600, "not a team key"),
    ("ab" * 31 + "\n", 0o600, "not a team key"),
    ("ab" * 5000, 0o600, "not a team key"),
])
def test_unusable_key_files_are_refused_with_what_to_do(tmp_path, content, mode, message):
    path = tmp_path / "team.key"
    path.write_text(content)
    os.chmod(path, mode)
    with pytest.raises(TeamKeyError, match=message):
        load_team_key(path)


def test_a_missing_key_is_told_apart(tmp_path):
    with pytest.raises(TeamKeyMissing):
        load_team_key(tmp_path / "none.key")


def test_tracker_proofs_need_the_key_and_both_nonces():
    key = key_of()
    peer, tracker = new_nonce(), new_nonce()
    assert is_nonce(peer) and not is_nonce(peer.upper()) and not is_nonce(peer[:-1])
    assert proof_matches(tracker_proof(key, peer, tracker), tracker_proof(key, peer, tracker))
    assert not proof_matches(tracker_proof(key, peer, tracker), tracker_proof(key_of(), peer, tracker))
    assert not proof_matches(tracker_proof(key, peer, tracker), tracker_proof(key, peer, new_nonce()))
    # A tracker's proof is never a peer's (no reflection), and non-strings never match.
    assert not proof_matches(peer_proof(key, peer, tracker), tracker_proof(key, peer, tracker))
    assert not proof_matches(peer_proof(key, peer, tracker), None)
    assert not proof_matches(peer_proof(key, peer, tracker), "\udcff")


def tracker_side(key: TeamKey):
    """The tracker's half of the exchange as pure functions (the real one is host/tracker/server.py)."""
    state: dict = {}

    def call(message: list) -> object:
        code, step, value = message
        assert code == TRACKER_AUTH
        if step == AUTH_HELLO:
            state["nonces"] = (value, new_nonce())
            return [TRACKER_SUCCESS, state["nonces"][1], tracker_proof(key, *state["nonces"])]
        assert step == AUTH_PROOF
        return TRACKER_SUCCESS if proof_matches(peer_proof(key, *state["nonces"]), value) else TRACKER_FAIL

    return call


def test_authenticate_to_tracker_accepts_the_team_and_refuses_others():
    key = key_of()
    authenticate_to_tracker(key, tracker_side(key))
    with pytest.raises(AuthRefused, match="proof of the key is wrong"):
        authenticate_to_tracker(key, tracker_side(key_of()))

    def closes(_message):
        raise OSError("connection reset")

    with pytest.raises(AuthRefused, match="closed the connection"):
        authenticate_to_tracker(key, closes)
    with pytest.raises(AuthRefused, match="answered the proof request"):
        authenticate_to_tracker(key, lambda _m: TRACKER_FAIL)


def test_session_proofs_are_for_one_match_key():
    key = key_of()
    gate = SessionGate(key, SKEW_SEC, 16)
    gate.check_tracker_session("rpi4:123", [b"-timeout=5", b"-auth=" + session_proof(key, "rpi4:123").encode()])
    for words, why in [
        ([b"-timeout=5"], "no proof"),
        ([b"-auth=" + session_proof(key, "rpi4:124").encode()], "wrong proof"),
        ([b"-auth=" + session_proof(key_of(), "rpi4:123").encode()], "wrong proof"),
        ([b"-auth=" + session_proof(key, "rpi4:123").encode()] * 2, "more than one"),
        ([b"-auth=\xff"], "not ASCII"),
    ]:
        with pytest.raises(AuthRefused, match=why):
            gate.check_tracker_session("rpi4:123", words)


def test_direct_tokens_are_good_once_within_the_window():
    key = key_of()
    gate = SessionGate(key, SKEW_SEC, 16)
    now = time.time()
    token = direct_token(key, "rpi4", now=now)
    gate.check_direct_session("rpi4", [b"-auth=" + token.encode()], now=now + 5)
    with pytest.raises(AuthRefused, match="replayed"):
        gate.check_direct_session("rpi4", [b"-auth=" + token.encode()], now=now + 6)
    for bad, why in [
        (direct_token(key, "rpi4", now=now - SKEW_SEC - 5), "outside the"),
        (direct_token(key, "rpi4", now=now + SKEW_SEC + 5), "outside the"),
        (direct_token(key, "rpi5", now=now), "wrong proof"),
        (direct_token(key_of(), "rpi4", now=now), "wrong proof"),
        ("12.34.56", "not UNIX_TIME.NONCE.HMAC"),
    ]:
        with pytest.raises(AuthRefused, match=why):
            gate.check_direct_session("rpi4", [b"-auth=" + bad.encode()], now=now)


def test_the_replay_cache_is_bounded_and_forgets_expired_nonces():
    cache = ReplayCache(max_entries=3)
    for i in range(3):
        cache.admit(f"n{i}", expires_at=100.0, now=50.0)
    with pytest.raises(AuthRefused, match="try again later"):
        cache.admit("n3", expires_at=100.0, now=60.0)
    cache.admit("n3", expires_at=200.0, now=150.0)  # the first three expired at 100
    assert len(cache) == 1

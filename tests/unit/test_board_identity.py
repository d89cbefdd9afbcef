"""What `devices` and `flash` believe about a board from the LAN: TXT strings cleaned where they are
parsed, conflicting advertisements flagged and skipped, board ids bound to SSH host keys."""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest

from device_agent.errors import AgentError
from device_agent.schema import BoardRecord, clean_text, is_clean_text
from host.discovery.browse import _Seen, merge
from host.errors import EdgetuneError
from host.flash.known_boards import KnownBoards
from host.flash.targets import by_mdns


# -- clean_text and the TXT record ---------------------------------------------------------------------
@pytest.mark.parametrize("raw,clean", [
    ("pi-kitchen", "pi-kitchen"),
    ("evil\x1b[31mred\x1b[0m", "evilred"),  # CSI colour
    ("a\x1b[2J\x1b[Hb", "ab"),  # clear screen, cursor home
    ("x\x1b]0;owned title\x07y", "xy"),  # OSC window title up to BEL
    ("x\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\y", "xlinky"),  # OSC 8 hyperlink up to ST
    ("x\x9b31my", "xy"),  # 8-bit CSI
    ("tab\there", "tab?here"),
    ("two\nlines\r", "two?lines?"),
    ("bell\x07", "bell?"),
    ("del\x7f", "del?"),
    ("rtl\u202eevil", "rtl?evil"),  # bidi override
    ("zero\u200bwidth", "zero?width"),
    ("line\u2028sep", "line?sep"),
    ("lone\x1b", "lone"),
    ("Ünïcödé 板", "Ünïcödé 板"),
])
def test_clean_text(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean
    assert is_clean_text(clean) and (raw == clean) == is_clean_text(raw)


def _record(**changes: str) -> BoardRecord:
    values = dict(board_id="0123456789abcdef0123456789abcdef", name="pi", key="rpi4", arch="aarch64",
                  triple="aarch64-linux-gnu", cpu="cortex-a72", cores=4)
    values.update(changes)
    return BoardRecord(**values)  # type: ignore[arg-type]


def test_the_txt_record_is_cleaned_where_it_is_parsed() -> None:
    txt = _record(name="pi\x1b[2J\x1b[31m-red\nline", key="rpi4\x1b[0m", cpu="cortex\ta72", model="Pi\u202e4").to_txt()
    txt["x-\x1b[1mextra"] = "v\x07"
    record = BoardRecord.from_txt({k.encode(): v.encode() for k, v in txt.items()})
    assert record.name == "pi-red?line" and record.key == "rpi4" and record.cpu == "cortex?a72"
    assert record.model == "Pi?4" and record.extra == {"x-extra": "v?"}
    assert all(is_clean_text(str(v)) for v in record.as_dict().values())


@pytest.mark.parametrize("board_id", ["", "has space", "new\nline", "x" * 65, "a/b"])
def test_a_record_with_an_unusable_board_id_is_refused(board_id: str) -> None:
    txt = _record().to_txt()
    txt["id"] = board_id
    with pytest.raises(AgentError, match="board id"):
        BoardRecord.from_txt(txt)  # type: ignore[arg-type]


# -- conflicts ---------------------------------------------------------------------------------------
def _seen(**services: tuple[BoardRecord, list[str]]) -> dict[str, _Seen]:
    return {f"{name}._edgetune._tcp.local.": _Seen(rec, addrs) for name, (rec, addrs) in services.items()}


def test_a_board_id_advertised_twice_flags_both_and_flash_skips_them() -> None:
    real, other = _record(), _record(board_id="f" * 32, name="pi-2")
    seen = _seen(pi=(real, ["127.0.0.1"]), pi_2=(real, ["127.0.0.2"]), other=(other, ["127.0.0.3"]))
    boards = merge(seen, None)
    flagged = [b for b in boards if b.conflict]
    assert len(flagged) == 2 and all("advertised 2 times" in (b.conflict or "") for b in flagged)
    assert all("127.0.0.1" in (b.conflict or "") and "127.0.0.2" in (b.conflict or "") for b in flagged)
    assert [b.name for b in boards if not b.conflict] == ["pi-2"]
    assert boards[0].as_dict()["conflict"] == boards[0].conflict

    plan = by_mdns(boards, None, "rpi4", True, 3.0, "root", None, 22)
    assert [(t.name, t.host, t.board_id) for t in plan.targets] == [("pi-2", "127.0.0.3", "f" * 32)]
    assert len(plan.skipped) == 2
    for result in plan.skipped:
        assert not result.ok and result.error and result.error.startswith("not flashed: board id ")
        assert "--host ADDRESS" in result.error and "\n" not in result.error
    # By name or by id, a flagged board is not flashed either.
    for device in ("pi", real.board_id):
        plan = by_mdns(boards, device, None, False, 3.0, "root", None, 22)
        assert not plan.targets and len(plan.skipped) == 2


def test_one_name_for_two_board_ids_flags_both() -> None:
    seen = _seen(a=(_record(), ["127.0.0.1"]), b=(_record(board_id="e" * 32), ["127.0.0.2"]))
    boards = merge(seen, None)
    assert all("2 boards are named 'pi'" in (b.conflict or "") for b in boards) and len(boards) == 2
    assert not by_mdns(boards, "pi", None, False, 3.0, "root", None, 22).targets


def test_one_board_on_several_addresses_is_no_conflict() -> None:
    boards = merge(_seen(pi=(_record(), ["192.168.1.20", "10.0.0.20"])), None)
    assert len(boards) == 1 and boards[0].conflict is None
    plan = by_mdns(boards, "pi", None, False, 3.0, "pi", "/k", 2222)
    (target,) = plan.targets
    assert (target.host, target.port, target.user, target.key_file, target.board_id) == (
        "192.168.1.20", 2222, "pi", "/k", _record().board_id)


# -- known boards ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def host_keys() -> tuple[paramiko.PKey, paramiko.PKey]:
    return paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()


def test_a_board_id_is_bound_to_its_first_host_key(tmp_path: Path, host_keys: tuple[paramiko.PKey, ...]) -> None:
    first, other = host_keys
    path = tmp_path / "cfg" / "known_boards"
    boards = KnownBoards(path)
    assert boards.lookup("abc") is None and not path.exists()
    entry = boards.bind("abc", "pi kitchen", first)
    assert entry is not None and entry.fingerprint == first.fingerprint
    assert boards.bind("abc", "pi kitchen", first) is None  # bound already, to that key
    assert path.read_text() == f"abc {first.get_name()} {first.get_base64()} pi kitchen\n"

    again = KnownBoards(path)  # a later flash reads it back
    bound = again.lookup("abc")
    assert bound is not None and bound.same_key(first) and not bound.same_key(other) and bound.name == "pi kitchen"
    with pytest.raises(EdgetuneError) as caught:
        again.bind("abc", "pi", other)
    message = str(caught.value)
    assert message.startswith("board pi presents a different SSH host key than before: ") and "\n" not in message
    assert other.fingerprint in message and first.fingerprint in message and "sed -i '/^abc /d'" in message
    assert len(path.read_text().splitlines()) == 1  # nothing recorded for the other key


def test_the_first_line_of_a_board_id_counts(tmp_path: Path, host_keys: tuple[paramiko.PKey, ...]) -> None:
    first, other = host_keys
    path = tmp_path / "known_boards"
    path.write_text(f"# comment\n\nabc {first.get_name()} {first.get_base64()}\n"
                    f"abc {other.get_name()} {other.get_base64()} later\n")
    bound = KnownBoards(path).lookup("abc")
    assert bound is not None and bound.same_key(first)


def test_a_broken_known_boards_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "known_boards"
    path.write_text("abc ssh-ed25519\n")
    with pytest.raises(EdgetuneError, match=r"line 1 is not 'BOARD-ID KEY-TYPE BASE64 \[NAME\]'"):
        KnownBoards(path).lookup("abc")
    path.write_text("abc ssh-ed25519 not*base64\n")
    with pytest.raises(EdgetuneError, match="line 1"):
        KnownBoards(path).lookup("abc")

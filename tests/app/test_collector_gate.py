"""The collector gate: kdump-tools' SSH commands inside one server's directory, nothing else.

The fast tests call the gate in-process; the others run OpenSSH's own clients
(``sftp -D`` over a pipe, then ``ssh`` and ``scp`` through a private sshd) with
exactly the commands kdump-tools 1.8.1's ``kdump_save_core_to_ssh`` sends.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from app import collector_gate as gate
from tests.sshd import PrivateSSHD

fast = pytest.mark.fast

STAMP = "202401011200"
STAMPDIR = f"/var/crash/10.0.0.5-{STAMP}"


def run_gate(server: Path, command: str, stdin: bytes = b"", max_bytes: int = 1 << 20) -> tuple:
    """The gate's (exit status, stdout, stderr) for one ``SSH_ORIGINAL_COMMAND``."""
    stdout, stderr = io.BytesIO(), io.StringIO()
    status = gate.run(command, str(server), io.BytesIO(stdin), stdout, stderr, max_bytes)
    return status, stdout.getvalue(), stderr.getvalue()


def snapshot(top: Path, skip: str = "sshd") -> dict[str, object]:
    """Every path under ``top`` (but ``skip``) with its kind and content: to show nothing moved."""
    found: dict[str, object] = {}
    for path in sorted(top.rglob("*")):
        if path.relative_to(top).parts[0] == skip:
            continue
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path)] = ("file", path.read_bytes())
        else:
            found[str(path)] = ("dir",)
    return found


@pytest.fixture
def server(tmp_path: Path) -> Path:
    """A server directory holding one stamp directory with a dump in flight, and traps:
    a symlink out of it, to a directory that holds a ``dump-incomplete`` of its own."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "dump-incomplete").write_bytes(b"outside")
    root = tmp_path / "server-a"
    (root / STAMPDIR.lstrip("/")).mkdir(parents=True)
    (root / STAMPDIR.lstrip("/") / "dump-incomplete").write_bytes(b"dump")
    (root / "var/crash/link").symlink_to(outside)
    return root


# -- the allowed commands ------------------------------------------------------------------


@fast
def test_mkdir_p_creates_the_directories_under_the_server_root(server: Path) -> None:
    assert run_gate(server, "mkdir -p /var/crash/10.0.0.9-202402020202")[0] == 0
    assert run_gate(server, "mkdir -p relative/dir")[0] == 0
    assert (server / "var/crash/10.0.0.9-202402020202").is_dir()
    assert (server / "relative/dir").is_dir()
    assert run_gate(server, f"mkdir -p {STAMPDIR}")[0] == 0  # exists already: fine


@fast
def test_dd_streams_stdin_into_dump_incomplete(server: Path) -> None:
    data = os.urandom(3 * gate.CHUNK + 100)
    status, _, stderr = run_gate(server, f"dd of={STAMPDIR}/dump-incomplete", data, 4 << 20)
    assert status == 0
    assert (server / STAMPDIR.lstrip("/") / "dump-incomplete").read_bytes() == data
    assert f"{len(data) // 512}+1 records in" in stderr
    assert f"{len(data)} bytes copied" in stderr


@fast
def test_dd_refuses_past_max_bytes_and_keeps_what_it_wrote(server: Path) -> None:
    status, _, stderr = run_gate(server, f"dd of={STAMPDIR}/dump-incomplete", b"x" * 1500, 1000)
    assert status == 1
    assert "larger than 1000 bytes" in stderr
    assert (server / STAMPDIR.lstrip("/") / "dump-incomplete").read_bytes() == b"x" * 1000


@fast
def test_mv_names_the_dump_and_the_vmcore(server: Path) -> None:
    stampdir = server / STAMPDIR.lstrip("/")
    (stampdir / "vmcore-incomplete").write_bytes(b"vmcore")
    assert run_gate(server, f"mv {STAMPDIR}/dump-incomplete {STAMPDIR}/dump.{STAMP}")[0] == 0
    assert run_gate(server, f"mv {STAMPDIR}/vmcore-incomplete {STAMPDIR}/vmcore.{STAMP}")[0] == 0
    assert sorted(p.name for p in stampdir.iterdir()) == [f"dump.{STAMP}", f"vmcore.{STAMP}"]
    assert (stampdir / f"dump.{STAMP}").read_bytes() == b"dump"
    assert (stampdir / f"vmcore.{STAMP}").read_bytes() == b"vmcore"


@fast
def test_mv_in_the_same_minute_never_overwrites(server: Path) -> None:
    stampdir = server / STAMPDIR.lstrip("/")
    mv = f"mv {STAMPDIR}/dump-incomplete {STAMPDIR}/dump.{STAMP}"
    for body in (b"second", b"third"):
        assert run_gate(server, mv)[0] == 0
        (stampdir / "dump-incomplete").write_bytes(body)
    assert run_gate(server, mv)[0] == 0
    assert sorted(p.name for p in stampdir.iterdir()) == [
        f"dump.{STAMP}",
        f"dump.{STAMP}.1",
        f"dump.{STAMP}.2",
    ]
    assert (stampdir / f"dump.{STAMP}").read_bytes() == b"dump"
    assert (stampdir / f"dump.{STAMP}.1").read_bytes() == b"second"
    assert (stampdir / f"dump.{STAMP}.2").read_bytes() == b"third"


@fast
def test_main_reads_the_command_from_ssh_original_command(
    server: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "mkdir -p /var/crash/x")
    assert gate.main([str(server)]) == 0
    assert (server / "var/crash/x").is_dir()
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "sh -c id")
    assert gate.main([str(server)]) == 1
    assert "crashlab collector: not allowed: sh -c id" in capsys.readouterr().err


# -- refusals ------------------------------------------------------------------------------

REFUSED = [
    "",
    "sh",
    "sh -c id",
    "bash -i",
    "cat /etc/passwd",
    "scp -t /var/crash",
    "rm -rf /",
    "mkdir /var/crash/new",
    "mkdir -p /var/crash/new /var/crash/other",
    "mkdir -p ../x",
    "mkdir -p /var/crash/../../x",
    "mkdir -p /var//crash/x",
    "mkdir -p /var/crash/x/",
    "mkdir -p /var/crash/.hidden",
    "mkdir -p 'a b'",
    "mkdir -p a/b/c/d/e/f/g/h/i",
    "mkdir -p /var/crash/link/x",
    "mkdir -p 'unterminated",
    f"dd if={STAMPDIR}/dump-incomplete",
    f"dd of={STAMPDIR}/dump-incomplete bs=1M",
    f"dd of={STAMPDIR}/other",
    "dd of=/var/crash/missing/dump-incomplete",
    "dd of=/../../x/dump-incomplete",
    "dd of=/var/crash/link/dump-incomplete",
    f"mv {STAMPDIR}/dump-incomplete {STAMPDIR}/evil",
    f"mv {STAMPDIR}/dump-incomplete {STAMPDIR}/dump.2024",
    f"mv {STAMPDIR}/dump-incomplete {STAMPDIR}/vmcore.{STAMP}",
    f"mv {STAMPDIR}/dump-incomplete /var/crash/dump.{STAMP}",
    f"mv {STAMPDIR}/dmesg.{STAMP} {STAMPDIR}/dump.{STAMP}",
    f"mv /var/crash/link/dump-incomplete /var/crash/link/dump.{STAMP}",
    f"mv -f {STAMPDIR}/dump-incomplete {STAMPDIR}/dump.{STAMP}",
    "crashlab-sftp -R",
]


@fast
@pytest.mark.parametrize("command", REFUSED)
def test_refuses_everything_else_and_writes_nothing(
    server: Path, tmp_path: Path, command: str
) -> None:
    before = snapshot(tmp_path)
    status, stdout, stderr = run_gate(server, command, b"payload")
    assert (status, stdout) == (1, b"")
    assert stderr == f"crashlab collector: not allowed: {command}\n"
    assert snapshot(tmp_path) == before


# -- SFTP, spoken by a tiny client ---------------------------------------------------------


def sftp_request(kind: int, request_id: int, *fields: bytes | int) -> bytes:
    """One request packet; ints are uint32, bytes are strings."""
    body = struct.pack(">I", request_id) if kind != gate.FXP_INIT else b""
    for field in fields:
        body += struct.pack(">I", field) if isinstance(field, int) else gate._string(field)
    return struct.pack(">IB", len(body) + 1, kind) + body


def sftp_replies(server: Path, *requests: bytes, max_bytes: int = 1 << 20) -> list[tuple]:
    """The (type, id, first uint32 after the id) of each reply to ``requests``."""
    status, stdout, stderr = run_gate(server, "crashlab-sftp", b"".join(requests), max_bytes)
    assert (status, stderr) == (0, "")
    replies, pos = [], 0
    while pos < len(stdout):
        length, kind = struct.unpack(">IB", stdout[pos : pos + 5])
        fields = stdout[pos + 5 : pos + 4 + length] + b"\0" * 8
        replies.append((kind, *struct.unpack(">II", fields[:8])))
        pos += 4 + length
    return replies


FX_OK, FX_NO_SUCH_FILE, FX_DENIED = 0, 2, 3
ATTRS_NONE = 0
WRITE_CREAT = gate.FXF_WRITE | 0x08


@fast
def test_sftp_creates_and_writes_a_file_as_scp_does(server: Path) -> None:
    target = f"{STAMPDIR}/dmesg.{STAMP}".encode()
    (server / STAMPDIR.lstrip("/") / f"dmesg.{STAMP}").write_bytes(b"an older, longer dmesg")
    write = sftp_request(gate.FXP_WRITE, 4, b"0", 0, 0, b"dmesg\n")  # offset: two uint32s
    fsetstat = sftp_request(gate.FXP_FSETSTAT, 5, b"0", gate.ATTR_SIZE, 0, 6)  # size: 2 x u32
    replies = sftp_replies(
        server,
        sftp_request(gate.FXP_INIT, 0, 3),
        sftp_request(gate.FXP_REALPATH, 1, b"."),
        sftp_request(gate.FXP_STAT, 2, f"{STAMPDIR}/nothing".encode()),
        sftp_request(gate.FXP_OPEN, 3, target, WRITE_CREAT, ATTRS_NONE),
        write,
        fsetstat,
        sftp_request(gate.FXP_FSTAT, 6, b"0"),
        sftp_request(gate.FXP_CLOSE, 7, b"0"),
    )
    assert [reply[0] for reply in replies] == [
        gate.FXP_VERSION,
        gate.FXP_NAME,
        gate.FXP_STATUS,
        gate.FXP_HANDLE,
        gate.FXP_STATUS,
        gate.FXP_STATUS,
        gate.FXP_ATTRS,
        gate.FXP_STATUS,
    ]
    assert replies[0][1] == 3  # version 3
    assert replies[2][2] == FX_NO_SUCH_FILE
    assert replies[4][2] == replies[5][2] == replies[7][2] == FX_OK
    assert (server / STAMPDIR.lstrip("/") / f"dmesg.{STAMP}").read_bytes() == b"dmesg\n"


@fast
@pytest.mark.parametrize(
    "request_",
    [
        sftp_request(gate.FXP_OPEN, 1, f"{STAMPDIR}/dump-incomplete".encode(), 1, 0),  # READ
        sftp_request(gate.FXP_OPEN, 1, b"/../x", WRITE_CREAT, 0),
        sftp_request(gate.FXP_OPEN, 1, b"/var/crash/missing/x", WRITE_CREAT, 0),
        sftp_request(gate.FXP_OPEN, 1, b"/var/crash/link/x", WRITE_CREAT, 0),
        sftp_request(gate.FXP_OPEN, 1, b"/var/crash/link", WRITE_CREAT, 0),
        sftp_request(gate.FXP_OPEN, 1, STAMPDIR.encode(), WRITE_CREAT, 0),
        # A dump arrives through dd and mv only, and is never written again.
        sftp_request(gate.FXP_OPEN, 1, f"{STAMPDIR}/dump-incomplete".encode(), WRITE_CREAT, 0),
        sftp_request(gate.FXP_OPEN, 1, f"{STAMPDIR}/dump.{STAMP}".encode(), WRITE_CREAT, 0),
        sftp_request(gate.FXP_OPEN, 1, f"{STAMPDIR}/dump.{STAMP}.1".encode(), WRITE_CREAT, 0),
        sftp_request(gate.FXP_OPEN, 1, f"{STAMPDIR}/vmcore.{STAMP}".encode(), WRITE_CREAT, 0),
        sftp_request(5, 1, b"0", 0, 0, 10),  # READ
        sftp_request(11, 1, b"/var/crash"),  # OPENDIR
        sftp_request(12, 1, b"0"),  # READDIR
        sftp_request(13, 1, f"{STAMPDIR}/dump-incomplete".encode()),  # REMOVE
        sftp_request(14, 1, b"/var/crash/new", 0),  # MKDIR
        sftp_request(15, 1, STAMPDIR.encode()),  # RMDIR
        sftp_request(18, 1, f"{STAMPDIR}/dump-incomplete".encode(), b"/x"),  # RENAME
        sftp_request(19, 1, b"/var/crash/link"),  # READLINK
        sftp_request(20, 1, b"/var/crash/l2", b"/"),  # SYMLINK
        sftp_request(200, 1, b"posix-rename@openssh.com", b"/a", b"/b"),  # EXTENDED
        sftp_request(gate.FXP_STAT, 1, b"/var/crash/link/dump-incomplete"),
        sftp_request(gate.FXP_REALPATH, 1, b"/var/../.."),
    ],
)
def test_sftp_denies_everything_else_and_writes_nothing(
    server: Path, tmp_path: Path, request_: bytes
) -> None:
    before = snapshot(tmp_path)
    replies = sftp_replies(server, sftp_request(gate.FXP_INIT, 0, 3), request_)
    assert replies[1][:3] == (gate.FXP_STATUS, 1, FX_DENIED)
    assert snapshot(tmp_path) == before


@fast
def test_sftp_refuses_writes_past_max_bytes(server: Path) -> None:
    target = f"{STAMPDIR}/vmcore-incomplete".encode()
    replies = sftp_replies(
        server,
        sftp_request(gate.FXP_INIT, 0, 3),
        sftp_request(gate.FXP_OPEN, 1, target, WRITE_CREAT, 0),
        sftp_request(gate.FXP_WRITE, 2, b"0", 0, 90, b"x" * 20),
        max_bytes=100,
    )
    assert replies[2][:3] == (gate.FXP_STATUS, 2, gate.FX_FAILURE)
    assert (server / target.decode().lstrip("/")).read_bytes() == b""


# -- OpenSSH's clients ---------------------------------------------------------------------


def test_openssh_sftp_client_over_a_pipe(server: Path, tmp_path: Path) -> None:
    """``sftp -D`` runs the gate as its server: put works, everything else is denied."""
    wrapper = tmp_path / "gate.sh"
    wrapper.write_text(f"#!/bin/sh\nexec {gate.forced_command(server)}\n")
    wrapper.chmod(0o755)
    local = tmp_path / "local"
    local.write_bytes(os.urandom(200_000))
    env = {**os.environ, "SSH_ORIGINAL_COMMAND": "crashlab-sftp"}

    def sftp(*lines: str) -> subprocess.CompletedProcess[str]:
        batch = "".join(line + "\n" for line in lines)
        argv = ["sftp", "-D", str(wrapper), "-b", "-"]
        return subprocess.run(argv, input=batch, env=env, capture_output=True, text=True)

    assert sftp(f"put {local} {STAMPDIR}/vmcore-incomplete").returncode == 0
    assert (server / STAMPDIR.lstrip("/") / "vmcore-incomplete").read_bytes() == local.read_bytes()
    before = snapshot(tmp_path)
    for line in [
        f"get {STAMPDIR}/dump-incomplete {tmp_path}/got",
        f"ls {STAMPDIR}",
        f"rm {STAMPDIR}/dump-incomplete",
        f"rename {STAMPDIR}/dump-incomplete {STAMPDIR}/dump.{STAMP}",
        "mkdir /var/crash/new",
        "symlink / /var/crash/root",
        f"put {local} /var/crash/link/x",
        f"put {local} /../x",
    ]:
        result = sftp(line)
        assert result.returncode != 0, line
    assert snapshot(tmp_path) == before


def kdump_save(sshd: PrivateSSHD, key: Path, dmesg: bytes, dump: bytes, tmp: Path) -> None:
    """kdump-tools' ``kdump_save_core_to_ssh``: its commands, in its order, each must succeed."""
    (tmp / f"dmesg.ssh.{STAMP}").write_bytes(dmesg)
    steps = [
        (sshd.ssh(key, "mkdir", "-p", STAMPDIR), b""),
        (sshd.scp(key, tmp / f"dmesg.ssh.{STAMP}", f"{STAMPDIR}/dmesg.{STAMP}"), b""),
        (sshd.ssh(key, "dd", f"of={STAMPDIR}/dump-incomplete"), dump),
        (sshd.ssh(key, "mv", f"{STAMPDIR}/dump-incomplete", f"{STAMPDIR}/dump.{STAMP}"), b""),
    ]
    for argv, stdin in steps:
        result = subprocess.run(argv, input=stdin, capture_output=True, timeout=60)
        assert result.returncode == 0, (argv, result.stderr)


@pytest.fixture
def two_servers(
    private_sshd: PrivateSSHD, tmp_path: Path
) -> tuple[PrivateSSHD, dict[str, Path], dict[str, Path]]:
    """Servers a and b, each a directory and a key whose sessions run the gate in it."""
    dirs = {name: tmp_path / "servers" / name for name in "ab"}
    keys = {}
    for name, directory in dirs.items():
        directory.mkdir(parents=True)
        keys[name] = private_sshd.add_key(name, gate.forced_command(directory, 1 << 24))
    return private_sshd, dirs, keys


def test_kdump_tools_sequence_through_a_real_sshd(two_servers: tuple, tmp_path: Path) -> None:
    sshd, dirs, keys = two_servers
    dump = os.urandom(3_000_000)
    kdump_save(sshd, keys["a"], b"first dmesg\n", dump, tmp_path)
    stampdir = dirs["a"] / STAMPDIR.lstrip("/")
    assert sorted(p.name for p in stampdir.iterdir()) == [f"dmesg.{STAMP}", f"dump.{STAMP}"]
    assert (stampdir / f"dmesg.{STAMP}").read_bytes() == b"first dmesg\n"
    assert (stampdir / f"dump.{STAMP}").read_bytes() == dump

    # the same minute again: the second dump lands beside the first
    kdump_save(sshd, keys["a"], b"second\n", b"second dump", tmp_path)
    assert (stampdir / f"dump.{STAMP}").read_bytes() == dump
    assert (stampdir / f"dump.{STAMP}.1").read_bytes() == b"second dump"
    assert (stampdir / f"dmesg.{STAMP}").read_bytes() == b"second\n"
    assert list(dirs["b"].iterdir()) == []

    # makedumpfile failed: kdump-tools scp's the raw vmcore, then renames it
    raw = tmp_path / "vmcore"
    raw.write_bytes(os.urandom(100_000))
    vmcore_temp = f"{STAMPDIR}/vmcore-incomplete"
    scp = subprocess.run(sshd.scp(keys["a"], raw, vmcore_temp), capture_output=True, timeout=60)
    assert scp.returncode == 0, scp.stderr
    mv = sshd.ssh(keys["a"], "mv", vmcore_temp, f"{STAMPDIR}/vmcore.{STAMP}")
    assert subprocess.run(mv, capture_output=True, timeout=60).returncode == 0
    assert (stampdir / f"vmcore.{STAMP}").read_bytes() == raw.read_bytes()


def test_a_key_can_do_nothing_else_through_a_real_sshd(two_servers: tuple, tmp_path: Path) -> None:
    sshd, dirs, keys = two_servers
    key = keys["a"]
    local = tmp_path / "local"
    local.write_bytes(b"payload")
    for directory in dirs.values():
        (directory / "var/crash/s").mkdir(parents=True)
    before = snapshot(tmp_path)
    attempts = [
        sshd.ssh(key, "sh", "-c", "id"),
        sshd.ssh(key, "id"),
        sshd.ssh(key),  # an interactive login
        sshd.ssh(key, "dd", "of=/../../x"),
        sshd.ssh(key, "dd", f"of={dirs['b']}/var/crash/s/dump-incomplete"),
        sshd.ssh(key, "dd", "of=../b/var/crash/s/dump-incomplete"),
        sshd.ssh(key, "mkdir", "-p", "../x"),
        sshd.ssh(key, "mkdir", "-p", "/../b/var/crash/new"),
        sshd.ssh(key, "cat", "/etc/hostname"),
        sshd.scp(key, local, "/../x"),
        sshd.scp(key, local, "../b/var/crash/s/x"),
        sshd.scp(key, local, "/var/crash/s/x", "-O"),  # legacy scp: an exec of "scp -t"
    ]
    for argv in attempts:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0, (argv, result.stdout)
        refusals = ("crashlab collector: not allowed", 'dest open "')  # the gate's, not sshd's
        assert any(refusal in result.stderr for refusal in refusals), (argv, result.stderr)
        assert "uid=" not in result.stdout
    assert snapshot(tmp_path) == before


@fast
def test_forced_command_quotes_its_arguments(tmp_path: Path) -> None:
    command = gate.forced_command(tmp_path / "a dir", 10)
    script = Path(gate.__file__).resolve()
    assert command == f"{sys.executable} -I {script} '{tmp_path}/a dir' --max-bytes 10"

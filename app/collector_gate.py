"""The dump collector's gate: what one server's SSH key may do, and nothing more.

Every session of a server's key runs ``python -m app.collector_gate SERVER_DIR
[--max-bytes N]`` (a forced ``command=`` in authorized_keys), with the client's
request in ``SSH_ORIGINAL_COMMAND``. The key sees SERVER_DIR as its root ``/``:
``/var/crash/x`` and ``var/crash/x`` both mean ``SERVER_DIR/var/crash/x``.

What is allowed is exactly what kdump-tools' ``kdump_save_core_to_ssh`` sends
(``/usr/sbin/kdump-config`` of kdump-tools 1.8.1, with ``STAMPDIR`` =
``<coredir>/<ip>-<STAMP>`` and ``STAMP`` = ``YYYYmmddHHMM``):

- ``mkdir -p STAMPDIR``: creates the directories;
- ``dd of=STAMPDIR/dump-incomplete``: the makedumpfile stream on stdin, written
  to that file (its directory must exist), refused past ``--max-bytes``;
- ``mv STAMPDIR/dump-incomplete STAMPDIR/dump.STAMP``, and the same for
  ``vmcore-incomplete`` and ``vmcore.STAMP`` (the raw vmcore sent by scp when
  makedumpfile fails). It never overwrites: two dumps of one server in the same
  minute share a stamp directory, so the second becomes ``dump.STAMP.1``;
- ``crashlab-sftp``: what sshd runs for an SFTP subsystem request (the
  configured ``Subsystem sftp crashlab-sftp``), because OpenSSH's scp (9.0 and
  later) sends the dmesg and the fallback vmcore over SFTP. A minimal SFTP v3
  server: files may be created and written in an existing directory, never
  read, listed, renamed or removed. OpenSSH 9.2's ``scp FILE host:PATH`` sends
  INIT, STAT of PATH, OPEN (WRITE|CREAT, no TRUNC), WRITEs, FSETSTAT (the size,
  the mode, the times) and CLOSE; the gate applies only FSETSTAT's size (an
  ftruncate of its own file, which a shorter file over a longer one needs).

Anything else (a shell, ``scp -t``, ``dd if=``, a path with ``..``, an empty
component, a name outside ``[A-Za-z0-9._:@+-]`` or beginning with ``.``, more
than eight components, a symlink anywhere) is refused: ``crashlab collector:
not allowed: <command>`` on stderr, exit status 1, nothing written. Paths are
walked one directory fd at a time with ``O_NOFOLLOW``, so no symlink can lead
out of SERVER_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import stat
import struct
import sys
import time
from collections.abc import Sequence
from typing import BinaryIO, TextIO

DEFAULT_MAX_BYTES = 16 * 1024**3
MAX_COMPONENTS = 8
SFTP_COMMAND = "crashlab-sftp"
CHUNK = 1024 * 1024

_NAME = re.compile(r"[A-Za-z0-9_:@+-][A-Za-z0-9._:@+-]*")
_STAMP = r"[0-9]{12}"
# The renames kdump-tools makes: (temporary name, final-name pattern).
_RENAMES = {
    "dump-incomplete": re.compile(rf"dump\.{_STAMP}"),
    "vmcore-incomplete": re.compile(rf"vmcore\.{_STAMP}"),
}
# Names scp (SFTP) may not write: a dump arrives only through dd, then mv, and a
# finished one is never written again. The scp fallback's vmcore-incomplete may.
_NOT_BY_SFTP = re.compile(rf"dump-incomplete|dump\.{_STAMP}(\.[0-9]+)?|vmcore\.{_STAMP}(\.[0-9]+)?")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotAllowed(Exception):
    """A request outside what the gate allows."""


class GateError(Exception):
    """An allowed request that failed (a missing file, a dump too large)."""


# -- paths ---------------------------------------------------------------------------------


def parse_path(path: str) -> list[str]:
    """The components of ``path`` under the key's root; NotAllowed if any is unsafe."""
    parts = path.removeprefix("/").split("/")
    if not 0 < len(parts) <= MAX_COMPONENTS or not all(_NAME.fullmatch(p) for p in parts):
        raise NotAllowed(path)
    return parts


def open_dir(root_fd: int, parts: Sequence[str], create: bool = False) -> int:
    """An fd of the directory ``parts`` under ``root_fd``, never through a symlink."""
    fd = os.dup(root_fd)
    try:
        for name in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
            next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except OSError:
        os.close(fd)
        raise
    return fd


# -- the commands kdump-tools runs ---------------------------------------------------------


def make_dirs(root_fd: int, path: str) -> None:
    """``mkdir -p path``."""
    try:
        os.close(open_dir(root_fd, parse_path(path), create=True))
    except OSError as exc:
        raise NotAllowed(path) from exc


def receive_dump(root_fd: int, path: str, stdin: BinaryIO, stderr: TextIO, max_bytes: int) -> None:
    """``dd of=path``: stdin into ``.../dump-incomplete``, at most ``max_bytes``."""
    parts = parse_path(path)
    if parts[-1] != "dump-incomplete":
        raise NotAllowed(path)
    try:
        dir_fd = open_dir(root_fd, parts[:-1])
    except OSError as exc:
        raise NotAllowed(path) from exc
    try:
        fd = os.open(parts[-1], _FILE_FLAGS | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        raise NotAllowed(path) from exc
    finally:
        os.close(dir_fd)
    started = time.monotonic()
    with open(fd, "wb") as out:
        total = _copy(stdin, out, max_bytes)
    _print_dd_summary(stderr, total, time.monotonic() - started)


def _copy(stdin: BinaryIO, out: BinaryIO, max_bytes: int) -> int:
    total = 0
    while chunk := stdin.read(CHUNK):
        room = max_bytes - total
        out.write(chunk[:room])
        total += min(len(chunk), room)
        if len(chunk) > room:
            raise GateError(f"dd: the dump is larger than {max_bytes} bytes; kept {total}")
    return total


def _print_dd_summary(stderr: TextIO, total: int, seconds: float) -> None:
    records = f"{total // 512}+{1 if total % 512 else 0}"
    stderr.write(f"{records} records in\n{records} records out\n")
    stderr.write(f"{total} bytes copied, {seconds:.3f} s\n")


def rename_dump(root_fd: int, source: str, target: str) -> str:
    """``mv DIR/dump-incomplete DIR/dump.STAMP``, never overwriting; returns the name used."""
    src, dst = parse_path(source), parse_path(target)
    pattern = _RENAMES.get(src[-1])
    if pattern is None or not pattern.fullmatch(dst[-1]) or src[:-1] != dst[:-1]:
        raise NotAllowed(f"{source} {target}")
    try:
        dir_fd = open_dir(root_fd, src[:-1])
    except OSError as exc:
        raise NotAllowed(source) from exc
    try:
        if not _is_regular(dir_fd, src[-1]):
            raise GateError(f"mv: {source}: no such file")
        name = _link_unused(dir_fd, src[-1], dst[-1])
        os.unlink(src[-1], dir_fd=dir_fd)
        return name
    finally:
        os.close(dir_fd)


def _is_regular(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _link_unused(dir_fd: int, source: str, target: str) -> str:
    """Hard-link ``source`` as ``target``, else ``target.1``, ``target.2``, ...: never replaces."""
    for index in range(10_000):
        name = f"{target}.{index}" if index else target
        try:
            os.link(source, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            return name
        except FileExistsError:
            continue
    raise GateError(f"mv: too many dumps named {target}")


# -- SFTP (draft-ietf-secsh-filexfer-02, version 3), the subset OpenSSH's scp uses ---------

FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE = 1, 2, 3, 4
FXP_WRITE, FXP_LSTAT, FXP_FSTAT, FXP_SETSTAT, FXP_FSETSTAT = 6, 7, 8, 9, 10
FXP_REALPATH, FXP_STAT = 16, 17
FXP_STATUS, FXP_HANDLE, FXP_ATTRS, FXP_NAME = 101, 102, 105, 104
FX_OK, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE, FX_BAD_MESSAGE = 0, 2, 3, 4, 5
FXF_READ, FXF_WRITE, FXF_TRUNC = 0x01, 0x02, 0x10
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 0x1, 0x2, 0x4, 0x8


class SFTPStatus(Exception):
    """A request answered with SSH_FXP_STATUS ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Reader:
    """Reads the fields of one packet's payload."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise SFTPStatus(FX_BAD_MESSAGE, "short packet")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.u32())

    def path(self) -> str:
        return self.string().decode("utf-8", errors="replace")


def _string(value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def _attrs(st: os.stat_result) -> bytes:
    flags = ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME
    return struct.pack(
        ">IQIIIII",
        flags,
        st.st_size,
        st.st_uid,
        st.st_gid,
        st.st_mode,
        int(st.st_atime) & 0xFFFFFFFF,
        int(st.st_mtime) & 0xFFFFFFFF,
    )


class SFTPServer:
    """A confined SFTP v3 server over two byte streams: create and write, nothing else."""

    def __init__(self, root_fd: int, max_bytes: int):
        self.root_fd = root_fd
        self.max_bytes = max_bytes
        self.handles: dict[bytes, int] = {}
        self._next_handle = 0

    def serve(self, stdin: BinaryIO, stdout: BinaryIO) -> None:
        """Answer packets until stdin ends."""
        try:
            while (packet := _read_packet(stdin)) is not None:
                stdout.write(self.answer(packet))
                stdout.flush()
        finally:
            for fd in self.handles.values():
                os.close(fd)
            self.handles.clear()

    def answer(self, packet: bytes) -> bytes:
        """The reply to one packet (its type byte and payload, without the length)."""
        kind, reader = packet[0], _Reader(packet[1:])
        if kind == FXP_INIT:
            return _packet(FXP_VERSION, struct.pack(">I", 3))
        request_id = reader.u32() if len(packet) >= 5 else 0
        try:
            return self._dispatch(kind, request_id, reader)
        except SFTPStatus as status:
            return _status(request_id, status.code, status.message)
        except OSError as exc:
            return _status(request_id, FX_FAILURE, exc.strerror or str(exc))

    def _dispatch(self, kind: int, request_id: int, reader: _Reader) -> bytes:
        ident = struct.pack(">I", request_id)
        if kind == FXP_REALPATH:
            name = self._realpath(reader.path())
            return _packet(FXP_NAME, ident + struct.pack(">I", 1) + _string(name) * 2 + b"\0" * 4)
        if kind in (FXP_STAT, FXP_LSTAT):
            return _packet(FXP_ATTRS, ident + _attrs(self._stat(reader.path())))
        if kind == FXP_FSTAT:
            return _packet(FXP_ATTRS, ident + _attrs(os.fstat(self._handle(reader.string()))))
        if kind == FXP_OPEN:
            return _packet(FXP_HANDLE, ident + _string(self._open(reader.path(), reader.u32())))
        if kind == FXP_WRITE:
            self._write(reader.string(), reader.u64(), reader.string())
        elif kind == FXP_CLOSE:
            os.close(self._close(reader))
        elif kind == FXP_SETSTAT:
            self._stat(reader.path())
        elif kind == FXP_FSETSTAT:
            self._truncate(self._handle(reader.string()), reader)
        else:
            raise SFTPStatus(
                FX_PERMISSION_DENIED, f"crashlab collector: request {kind} not allowed"
            )
        return _status(request_id, FX_OK, "")

    def _realpath(self, path: str) -> str:
        if path in ("", ".", "/"):
            return "/"
        return "/" + "/".join(_sftp_path(path.removeprefix("./")))

    def _stat(self, path: str) -> os.stat_result:
        parts = [] if path in ("", ".", "/") else _sftp_path(path)
        try:
            dir_fd = open_dir(self.root_fd, parts[:-1])
        except FileNotFoundError as exc:
            raise SFTPStatus(FX_NO_SUCH_FILE, "no such file") from exc
        except OSError as exc:
            raise SFTPStatus(FX_PERMISSION_DENIED, f"not allowed: {path}") from exc
        try:
            if not parts:
                return os.fstat(dir_fd)
            return os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise SFTPStatus(FX_NO_SUCH_FILE, "no such file") from exc
        finally:
            os.close(dir_fd)

    def _open(self, path: str, pflags: int) -> bytes:
        parts = _sftp_path(path)
        if pflags & FXF_READ or not pflags & FXF_WRITE:
            raise SFTPStatus(FX_PERMISSION_DENIED, "crashlab collector: files are never read")
        if parts and _NOT_BY_SFTP.fullmatch(parts[-1]):
            raise SFTPStatus(FX_PERMISSION_DENIED, f"not allowed by scp: {path}")
        try:
            dir_fd = open_dir(self.root_fd, parts[:-1])
        except OSError as exc:
            raise SFTPStatus(FX_PERMISSION_DENIED, f"not allowed: {path}") from exc
        try:
            flags = _FILE_FLAGS | (os.O_TRUNC if pflags & FXF_TRUNC else 0)
            fd = os.open(parts[-1], flags, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            raise SFTPStatus(FX_PERMISSION_DENIED, f"not allowed: {path}") from exc
        finally:
            os.close(dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SFTPStatus(FX_PERMISSION_DENIED, f"not a regular file: {path}")
        handle = str(self._next_handle).encode()
        self._next_handle += 1
        self.handles[handle] = fd
        return handle

    def _write(self, handle: bytes, offset: int, data: bytes) -> None:
        if offset + len(data) > self.max_bytes:
            raise SFTPStatus(FX_FAILURE, f"crashlab collector: larger than {self.max_bytes} bytes")
        fd = self._handle(handle)
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written

    def _truncate(self, fd: int, reader: _Reader) -> None:
        """Apply an FSETSTAT's size, nothing else: scp opens without TRUNC and sets the size."""
        if reader.u32() & ATTR_SIZE:
            size = reader.u64()
            if size > self.max_bytes:
                raise SFTPStatus(
                    FX_FAILURE, f"crashlab collector: larger than {self.max_bytes} bytes"
                )
            os.ftruncate(fd, size)

    def _close(self, reader: _Reader) -> int:
        handle = reader.string()
        self._handle(handle)
        return self.handles.pop(handle)

    def _handle(self, handle: bytes) -> int:
        fd = self.handles.get(handle)
        if fd is None:
            raise SFTPStatus(FX_FAILURE, "no such handle")
        return fd


def _sftp_path(path: str) -> list[str]:
    try:
        return parse_path(path)
    except NotAllowed as exc:
        raise SFTPStatus(FX_PERMISSION_DENIED, f"crashlab collector: not allowed: {path}") from exc


def _read_packet(stdin: BinaryIO) -> bytes | None:
    header = _read_exact(stdin, 4)
    if header is None:
        return None
    length = struct.unpack(">I", header)[0]
    if not 0 < length <= 256 * 1024:
        raise GateError(f"sftp: bad packet length {length}")
    body = _read_exact(stdin, length)
    if body is None:
        raise GateError("sftp: connection closed inside a packet")
    return body


def _read_exact(stdin: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stdin.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _packet(kind: int, payload: bytes) -> bytes:
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def _status(request_id: int, code: int, message: str) -> bytes:
    payload = struct.pack(">II", request_id, code) + _string(message) + _string("")
    return _packet(FXP_STATUS, payload)


# -- the entry point -----------------------------------------------------------------------


def run(
    command: str,
    server_dir: str,
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Carry out ``command`` (``SSH_ORIGINAL_COMMAND``) inside ``server_dir``; the exit status."""
    try:
        root_fd = os.open(server_dir, _DIR_FLAGS)
    except OSError as exc:
        stderr.write(f"crashlab collector: no server directory {server_dir}: {exc.strerror}\n")
        return 1
    try:
        _carry_out(command, root_fd, stdin, stdout, stderr, max_bytes)
    except NotAllowed:
        stderr.write(f"crashlab collector: not allowed: {command}\n")
        return 1
    except GateError as exc:
        stderr.write(f"crashlab collector: {exc}\n")
        return 1
    except OSError as exc:
        # A full disk, or a file gone under a concurrent session: said, with no path.
        stderr.write(f"crashlab collector: {exc.strerror}\n")
        return 1
    finally:
        os.close(root_fd)
    return 0


def _carry_out(
    command: str, root_fd: int, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO, max_bytes: int
) -> None:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise NotAllowed(command) from exc
    match argv:
        case ["mkdir", "-p", path]:
            make_dirs(root_fd, path)
        case ["dd", of] if of.startswith("of="):
            receive_dump(root_fd, of.removeprefix("of="), stdin, stderr, max_bytes)
        case ["mv", source, target]:
            rename_dump(root_fd, source, target)
        case [name] if name == SFTP_COMMAND:
            SFTPServer(root_fd, max_bytes).serve(stdin, stdout)
        case _:
            raise NotAllowed(command)


def forced_command(server_dir: str | os.PathLike[str], max_bytes: int | None = None) -> str:
    """The gate's command line for one server's ``command=`` in authorized_keys.

    Run by file path in isolated mode (``-I``): sshd gives the session no
    environment, and the gate needs nothing beyond the standard library.
    """
    argv = [sys.executable, "-I", os.path.abspath(__file__), os.fspath(server_dir)]
    if max_bytes is not None:
        argv += ["--max-bytes", str(max_bytes)]
    return shlex.join(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.collector_gate", description=__doc__)
    parser.add_argument("server_dir")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args(argv)
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    return run(
        command, args.server_dir, sys.stdin.buffer, sys.stdout.buffer, sys.stderr, args.max_bytes
    )


if __name__ == "__main__":
    sys.exit(main())

"""Build crashlab's guest image from Debian packages only.

A guest image is a Debian kernel and a busybox initramfs whose ``/init``
configures the guest for one ``ImageVariant`` and prints console markers that
crashlab keys on::

    CRASHLAB-READY variant=kdump kernel=6.1.0-56-amd64 unknown_nmi_panic=1 \
        kexec_crash_loaded=1 uptime=2.31                     (one line)
    CRASHLAB-CRASH-KERNEL kernel=6.1.0-56-amd64 vmcore_bytes=620756992
    CRASHLAB-PANIC-LOG [   12.34] Kernel panic - not syncing: NMI: Not continuing
    CRASHLAB-DUMP-SAVED bytes=17825792
    CRASHLAB-DUMP-FAILED rc=1
    CRASHLAB-ERROR <what>

Inputs, all taken from the host's apt configuration, never from elsewhere:

- the kernel: the versioned package that ``linux-image-amd64`` depends on,
  fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (installing it
  would run initramfs hooks on the host);
- busybox from ``busybox-static``;
- ``kexec``, ``makedumpfile`` and ``qemu-ga`` (``qemu-guest-agent``) from the
  host's packages, with the shared libraries ``ldd`` lists (kexec also links
  the Xen libraries); for the kdump-ssh variant also ``ssh`` and ``scp``
  (``openssh-client``).

Beyond the disk's virtio modules, ``/init`` loads ``virtio_console``, for the
QEMU guest agent's virtio-serial port, and ``qemu_fw_cfg``, through which the
kernel publishes its VMCOREINFO to QEMU (``etc/vmcoreinfo``) when the domain
has ``<vmcoreinfo state='on'/>`` (emulators/guest.py). Where the domain has
the agent's channel, ``/init`` starts ``qemu-ga`` on the port named
``org.qemu.guest_agent.0`` and prints READY once the agent holds it open, so
crash readiness (app/readiness.py) can read the guest's settings at once. The
kdump variant also writes the command line it gives ``kexec -p`` to
``CRASH_KERNEL_CMDLINE_FILE``: the kernel keeps no copy of it.

The kdump variant carries the kernel and a second, smaller initramfs (the same
``/init`` without kexec and the kernel) for ``kexec -p``. The crash kernel's
``/init`` sees ``/proc/vmcore``, writes a flattened, compressed dump with
``makedumpfile -F -c -d 31`` to the raw dump disk ``/dev/vda``, then powers off.

The kdump-ssh variant's crash kernel instead sends the dump over SSH exactly as
Debian's kdump-tools 1.8.1 does with ``SSH=`` set (``SAVE_DUMP_OVER_SSH``): to
``$KDUMP_COREDIR/<its address>-<stamp>/`` on the collector it writes
``dmesg.<stamp>`` with scp, then streams the flattened dump through
``ssh ... dd`` into ``dump-incomplete`` and renames it ``dump.<stamp>``; the
dump disk is left untouched. Its initramfs adds ``virtio_net`` (with
``failover`` and ``net_failover``), OpenSSH's client, a root user and an
``/etc/ssh/ssh_config`` that carries every ssh and scp over one multiplexed
connection. The network is QEMU's user-mode one that emulators/guest.py adds:
the crash kernel is ``GUEST_ADDRESS``/24 and reaches only the collector, at
``COLLECTOR_GUEST_ADDRESS`` port 22. The image holds no key: the server's
private key, the collector's ``known_hosts`` line, the target ``user@host``
and optionally ``KDUMP_COREDIR`` (default ``/var/crash``) come from the
fw_cfg blobs ``FW_CFG_*`` under ``/sys/firmware/qemu_fw_cfg/by_name/``. The
markers are the kdump variant's; a failure before the dump names its step
(``rc=no-ssh-key``, ``rc=no-network``, ``rc=ssh-255``, ``rc=mv``).

Images are cached under ``$CRASHLAB_CACHE/images/<variant>-<digest>/``
(default ``<repo>/.cache/crashlab``, or ``/var/cache/crashlab`` when QEMU
cannot reach the checkout: see ``cache_root``); the digest covers every input, so an image
is rebuilt only when one of them changes.
"""

from __future__ import annotations

import dataclasses
import enum
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.readiness import CRASH_KERNEL_CMDLINE_FILE

# Bump when the image layout changes in a way the other inputs do not show.
BUILDER_VERSION = "2"

KERNEL_METAPACKAGE = "linux-image-amd64"

# Load order matters: each module needs the ones before it.
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)
# Beyond the disk: the guest agent's virtio-serial port, and fw_cfg, through
# which the kernel publishes its VMCOREINFO to QEMU (neither needs another).
GUEST_MODULES = (*VIRTIO_MODULES, "virtio_console", "qemu_fw_cfg")
# The kdump-ssh crash kernel's network card, loaded after GUEST_MODULES.
NETWORK_MODULES = ("failover", "net_failover", "virtio_net")
# Every module unpack_kernel keeps from the kernel package.
KERNEL_MODULES = (*GUEST_MODULES, *NETWORK_MODULES)
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"

# The kdump-ssh crash kernel's view of the dump network (QEMU user networking,
# emulators/guest.py): its own address, and the collector's, forwarded to the host.
GUEST_ADDRESS = "10.0.2.15"
COLLECTOR_GUEST_ADDRESS = "10.0.2.100"
# The fw_cfg blobs (/sys/firmware/qemu_fw_cfg/by_name/<name>/raw) that carry a
# server's dump target to the kdump-ssh crash kernel, so the image stays generic.
FW_CFG_SSH_KEY = "opt/org.crashlab/ssh-key"
FW_CFG_SSH_TARGET = "opt/org.crashlab/ssh-target"
FW_CFG_KNOWN_HOSTS = "opt/org.crashlab/known-hosts"
FW_CFG_COREDIR = "opt/org.crashlab/coredir"
# kdump-tools' defaults (/etc/default/kdump-tools): where the dumps go, and
# how often the first ssh is tried, 3 s apart.
KDUMP_COREDIR = "/var/crash"
SSH_KDUMP_RETRY = 16

# The crash kernel's command line, as Debian's kdump-tools builds it.
CRASH_KERNEL_CMDLINE = "console=ttyS0 irqpoll nr_cpus=1 reset_devices"

# 256 MiB is the reservation verified on this testbed with 768 MiB of guest RAM.
CRASHKERNEL = "256M"

READY_MARKER = "CRASHLAB-READY"
CRASH_KERNEL_MARKER = "CRASHLAB-CRASH-KERNEL"
PANIC_LOG_MARKER = "CRASHLAB-PANIC-LOG"
DUMP_SAVED_MARKER = "CRASHLAB-DUMP-SAVED"
DUMP_FAILED_MARKER = "CRASHLAB-DUMP-FAILED"
ERROR_MARKER = "CRASHLAB-ERROR"


class ImageBuildError(Exception):
    """The image could not be built; the message names the failing step."""

    def __repr__(self) -> str:
        return f"ImageBuildError({str(self)!r})"


class ImageVariant(enum.StrEnum):
    """How the guest reacts to an NMI."""

    KDUMP = "kdump"
    """The NMI panics the guest; the crash kernel saves a vmcore to the dump disk."""

    NO_KDUMP = "no-kdump"
    """The NMI panics the guest; no crash kernel is loaded, so no dump is taken."""

    NMI_IGNORED = "nmi-ignored"
    """``unknown_nmi_panic=0``: the kernel logs "Dazed and confused" and carries on."""

    KDUMP_SSH = "kdump-ssh"
    """As kdump, but the crash kernel sends the vmcore over SSH, as kdump-tools' SSH= does."""

    @property
    def unknown_nmi_panic(self) -> bool:
        return self is not ImageVariant.NMI_IGNORED

    @property
    def loads_crash_kernel(self) -> bool:
        return self in (ImageVariant.KDUMP, ImageVariant.KDUMP_SSH)

    @property
    def dumps_over_ssh(self) -> bool:
        return self is ImageVariant.KDUMP_SSH


@dataclass(frozen=True)
class GuestImage:
    """A built image: boot ``kernel`` with ``initrd`` and ``cmdline``."""

    variant: ImageVariant
    kernel: Path
    initrd: Path
    cmdline: str
    kernel_release: str
    digest: str


@dataclass(frozen=True)
class ImageInputs:
    """Everything an image is made from; its digest names the cached image."""

    variant: ImageVariant
    kernel_package: str
    kernel_version: str
    busybox_version: str
    kexec_version: str
    makedumpfile_version: str
    qemu_guest_agent_version: str
    cmdline: str
    init_script: str
    builder_version: str = BUILDER_VERSION
    # Only the kdump-ssh image carries OpenSSH's client, and its configuration.
    openssh_client_version: str = ""
    ssh_config: str = ""

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        # Left out where empty, so the images without ssh keep the digests
        # (and the cached builds) they had before these fields existed.
        for name in ("openssh_client_version", "ssh_config"):
            if not fields[name]:
                del fields[name]
        text = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# What the ``nmi-ignored`` kernel writes on its console for each NMI it survives.
NMI_LOGGED = "NMI received for unknown reason"

# Where the guest files go when the checkout is out of QEMU's reach (below).
SHARED_CACHE = Path("/var/cache/crashlab")


def cache_root() -> Path:
    """``$CRASHLAB_CACHE``, else ``.cache/crashlab`` at the top of the repository.

    Under qemu:///system QEMU runs as its own user (libvirt-qemu), which must
    reach the kernel, initrd and disks through every parent directory. A
    checkout below a private directory (``mktemp -d`` makes them 0700) is out
    of its reach; the cache then lives in ``SHARED_CACHE``, whose images are
    keyed by their inputs' digest and so safe to share between checkouts.
    """
    if env := os.environ.get("CRASHLAB_CACHE"):
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if _others_can_enter(repo):
        return repo / ".cache" / "crashlab"
    return SHARED_CACHE


def _others_can_enter(directory: Path) -> bool:
    """Whether a user other than the owner can traverse ``directory`` and its parents."""
    return all(d.stat().st_mode & stat.S_IXOTH for d in (directory, *directory.parents))


def kernel_cmdline(variant: ImageVariant, extra: str = "") -> str:
    """The guest kernel's command line.

    ``panic=0`` (wait forever) is spelled out on purpose: a panicked no-kdump
    guest must stay up so its console and state can be read, not reboot into a
    fresh console. ``unknown_nmi_panic`` is also set by ``/init``; having it on
    the command line makes the variant visible in ``/proc/cmdline``.
    """
    words = ["console=ttyS0", "panic=0"]
    if variant.unknown_nmi_panic:
        words.append("unknown_nmi_panic")
    if variant.loads_crash_kernel:
        words.append(f"crashkernel={CRASHKERNEL}")
    if extra:
        words.append(extra)
    return " ".join(words)


def render_init(variant: ImageVariant) -> str:
    """The initramfs ``/init`` for ``variant``; also the crash kernel's ``/init``."""
    load_crash_kernel = (
        'kexec -p /boot/vmlinuz --initrd=/boot/crash-initrd.img --append="$CRASH_CMDLINE" '
        '|| echo "CRASHLAB-ERROR kexec -p failed"\n'
        # The kernel keeps no copy of the crash kernel's command line: publish it.
        f'mkdir -p "$(dirname {CRASH_KERNEL_CMDLINE_FILE})" && '
        f'echo "$CRASH_CMDLINE" > {CRASH_KERNEL_CMDLINE_FILE}'
        if variant.loads_crash_kernel
        else ": no crash kernel in this variant"
    )
    return INIT_TEMPLATE.format(
        variant=variant.value,
        unknown_nmi_panic=int(variant.unknown_nmi_panic),
        crash_cmdline=CRASH_KERNEL_CMDLINE,
        modules=" ".join(GUEST_MODULES),
        load_crash_kernel=load_crash_kernel,
        agent_port=GUEST_AGENT_PORT,
        save_dump_over_ssh=render_save_dump_over_ssh() if variant.dumps_over_ssh else "",
        save_dump="save_dump_over_ssh" if variant.dumps_over_ssh else "save_dump",
    )


def render_save_dump_over_ssh() -> str:
    """The kdump-ssh crash kernel's ``save_dump_over_ssh`` shell function."""
    return SAVE_DUMP_OVER_SSH.format(
        network_modules=" ".join(NETWORK_MODULES),
        fw_cfg_ssh_key=FW_CFG_SSH_KEY,
        fw_cfg_ssh_target=FW_CFG_SSH_TARGET,
        fw_cfg_known_hosts=FW_CFG_KNOWN_HOSTS,
        fw_cfg_coredir=FW_CFG_COREDIR,
        kdump_coredir=KDUMP_COREDIR,
        known_hosts=SSH_KNOWN_HOSTS_FILE,
        guest_address=GUEST_ADDRESS,
        retries=SSH_KDUMP_RETRY,
    )


INIT_TEMPLATE = r"""#!/bin/sh
# crashlab guest init, variant {variant}. Generated by emulators/guest_image.py.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in {modules}; do
    insmod /lib/modules/$m.ko || echo "CRASHLAB-ERROR insmod $m"
done

save_dump() {{
    n=0
    while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.2; n=$((n + 1)); done
    if [ ! -b /dev/vda ]; then
        echo "CRASHLAB-DUMP-FAILED rc=no-dump-disk"
        return
    fi
    {{ makedumpfile -F -c -d 31 --message-level 4 /proc/vmcore; echo $? > /tmp/rc; }} \
        | tee /dev/vda | wc -c > /tmp/bytes
    sync
    rc=$(cat /tmp/rc)
    bytes=$(tr -d " " < /tmp/bytes)
    if [ "$rc" = 0 ]; then
        echo "CRASHLAB-DUMP-SAVED bytes=$bytes"
    else
        echo "CRASHLAB-DUMP-FAILED rc=$rc"
    fi
}}
{save_dump_over_ssh}
# The panicked kernel's last words never reach the console: printk from NMI
# context is deferred and kexec runs first. Replay them from its log buffer.
replay_panic_log() {{
    makedumpfile --dump-dmesg /proc/vmcore /tmp/dmesg > /dev/null 2>&1 || return
    grep -E "NMI received|Dazed and confused|Kernel panic" /tmp/dmesg \
        | tail -n 5 | sed "s/^/CRASHLAB-PANIC-LOG /"
}}

if [ -e /proc/vmcore ]; then
    echo "CRASHLAB-CRASH-KERNEL kernel=$(uname -r) vmcore_bytes=$(stat -c %s /proc/vmcore)"
    replay_panic_log
    {save_dump}
    poweroff -f
fi

# The QEMU guest agent, on its virtio-serial port, where the domain has one
# (no udev: the port is found by name in sysfs). The host announces ports
# after the driver binds, so wait for it, only where a controller exists.
start_guest_agent() {{
    ls /sys/bus/virtio/drivers/virtio_console/ 2>/dev/null | grep -q virtio || return 0
    n=0
    while [ $n -lt 50 ]; do
        for port in /sys/class/virtio-ports/*; do
            [ "$(cat "$port/name" 2>/dev/null)" = "{agent_port}" ] || continue
            watch_guest_agent "/dev/$(basename "$port")"
            return 0
        done
        sleep 0.1
        n=$((n + 1))
    done
    echo "CRASHLAB-ERROR no {agent_port} port"
}}

# In the foreground, not with -d: a daemon opens its port after the parent has
# exited 0. Started means holding the port open, so READY follows only then.
watch_guest_agent() {{
    mkdir -p /run/qemu-ga
    qemu-ga -m virtio-serial -p "$1" -t /run/qemu-ga < /dev/null 2> /run/qemu-ga.log &
    pid=$!
    n=0
    while [ $n -lt 50 ]; do
        for fd in /proc/$pid/fd/*; do
            [ "$(readlink "$fd")" = "$1" ] && return 0
        done
        if [ ! -r /proc/$pid/status ] || grep -q "^State:[[:space:]]*[ZX]" /proc/$pid/status; then
            echo "CRASHLAB-ERROR qemu-ga did not start: $(tail -n 1 /run/qemu-ga.log)"
            return 0
        fi
        sleep 0.1
        n=$((n + 1))
    done
    echo "CRASHLAB-ERROR qemu-ga did not open $1"
}}

CRASH_CMDLINE="{crash_cmdline}"
echo {unknown_nmi_panic} > /proc/sys/kernel/unknown_nmi_panic
{load_crash_kernel}
start_guest_agent
echo "CRASHLAB-READY variant={variant} kernel=$(uname -r)" \
    "unknown_nmi_panic=$(cat /proc/sys/kernel/unknown_nmi_panic)" \
    "kexec_crash_loaded=$(cat /sys/kernel/kexec_crash_loaded)" \
    "uptime=$(cut -d " " -f 1 /proc/uptime)"
while :; do sleep 3600; done
"""

# Where the kdump-ssh crash kernel keeps the collector's host key (ssh_config below).
SSH_KNOWN_HOSTS_FILE = "/root/.ssh/known_hosts"

# Debian kdump-tools 1.8.1's kdump_save_core_to_ssh (/usr/sbin/kdump-config)
# with SSH= set, HOSTTAG=ip and no KDUMP_COMPRESSION: the same ssh, scp and
# makedumpfile commands, in the same order. Left out: its fallback to an scp of
# /proc/vmcore when makedumpfile fails (a raw vmcore would not fit the time a
# testbed guest has). /etc/ssh/ssh_config makes every ssh and scp share one
# connection, the only one QEMU's guestfwd carries (emulators/guest.py); the
# first ssh opens it and ``ssh -O exit`` closes it.
SAVE_DUMP_OVER_SSH = r"""
# The dump target is the server's, passed through fw_cfg (emulators/guest.py).
save_dump_over_ssh() {{
    fw=/sys/firmware/qemu_fw_cfg/by_name
    for blob in {fw_cfg_ssh_key} {fw_cfg_ssh_target} {fw_cfg_known_hosts}; do
        if [ ! -r "$fw/$blob/raw" ]; then
            echo "CRASHLAB-DUMP-FAILED rc=no-$(basename "$blob")"
            return
        fi
    done
    SSH=$(cat "$fw/{fw_cfg_ssh_target}/raw")
    SSH_KEY=/root/.ssh/kdump_id_rsa
    (umask 077 && cat "$fw/{fw_cfg_ssh_key}/raw" > "$SSH_KEY")
    cat "$fw/{fw_cfg_known_hosts}/raw" > {known_hosts}
    KDUMP_COREDIR={kdump_coredir}
    if [ -r "$fw/{fw_cfg_coredir}/raw" ]; then
        KDUMP_COREDIR=$(cat "$fw/{fw_cfg_coredir}/raw")
    fi
    bring_up_network || return
    send_dump_over_ssh
    ssh -O exit "$SSH" 2> /dev/null
    cat /tmp/result
}}

bring_up_network() {{
    for m in {network_modules}; do
        insmod /lib/modules/$m.ko || echo "CRASHLAB-ERROR insmod $m"
    done
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    if [ ! -e /sys/class/net/eth0 ]; then
        echo "CRASHLAB-DUMP-FAILED rc=no-network"
        return 1
    fi
    ip link set lo up
    ip link set eth0 up
    ip addr add {guest_address}/24 dev eth0
}}

# Writes its marker to /tmp/result, printed once the connection is closed.
send_dump_over_ssh() {{
    SSH_STAMP=$(date +"%Y%m%d%H%M")
    THIS_HOST="$(ip addr show up | sed -n 's/^\s*inet\s\+\([^/ ]*\).*$/\1/p' | tail -n1)"
    SSH_STAMPDIR=$KDUMP_COREDIR/$THIS_HOST-$SSH_STAMP
    CNT={retries}
    while [ "$CNT" -ne 0 ]; do
        ssh -i "$SSH_KEY" "$SSH" mkdir -p "$SSH_STAMPDIR"
        ERROR=$?
        if [ "$ERROR" -eq 0 ]; then
            CNT=0
        else
            CNT=$((CNT - 1))
            sleep 3
        fi
    done
    if [ "$ERROR" -ne 0 ]; then
        echo "CRASHLAB-DUMP-FAILED rc=ssh-$ERROR" > /tmp/result
        return
    fi
    if makedumpfile --dump-dmesg /proc/vmcore "/tmp/dmesg.ssh.$SSH_STAMP"; then
        scp -i "$SSH_KEY" "/tmp/dmesg.ssh.$SSH_STAMP" "$SSH:$SSH_STAMPDIR/dmesg.$SSH_STAMP" \
            || echo "CRASHLAB-ERROR scp of the dmesg failed"
    fi
    # Counted on the way past: the collector sees the same bytes.
    mkfifo /tmp/dump.fifo
    wc -c < /tmp/dump.fifo > /tmp/bytes &
    counter=$!
    {{ makedumpfile -F -c -d 31 /proc/vmcore; echo $? > /tmp/rc; }} | tee /tmp/dump.fifo \
        | ssh -i $SSH_KEY "$SSH" dd "of=$SSH_STAMPDIR/dump-incomplete"
    ERROR=$?
    wait $counter
    rc=$(cat /tmp/rc)
    if [ "$rc" != 0 ]; then
        echo "CRASHLAB-DUMP-FAILED rc=$rc" > /tmp/result
    elif [ "$ERROR" -ne 0 ]; then
        echo "CRASHLAB-DUMP-FAILED rc=ssh-$ERROR" > /tmp/result
    elif ! ssh -i "$SSH_KEY" "$SSH" mv "$SSH_STAMPDIR/dump-incomplete" \
            "$SSH_STAMPDIR/dump.$SSH_STAMP"; then
        echo "CRASHLAB-DUMP-FAILED rc=mv" > /tmp/result
    else
        echo "CRASHLAB-DUMP-SAVED bytes=$(tr -d " " < /tmp/bytes)" > /tmp/result
    fi
}}
"""

# The crash kernel's OpenSSH client settings. One connection for every ssh and
# scp (see SAVE_DUMP_OVER_SSH); no prompt; only the collector's known host key.
# ConnectTimeout also bounds the wait for the server's banner, which never
# comes when QEMU has no connection to the collector.
SSH_CONFIG = f"""\
Host *
    ControlMaster auto
    ControlPath /tmp/ssh-%C
    ControlPersist yes
    BatchMode yes
    StrictHostKeyChecking yes
    UserKnownHostsFile {SSH_KNOWN_HOSTS_FILE}
    ConnectTimeout 10
    ServerAliveInterval 10
    ServerAliveCountMax 6
"""


def _run(args: list[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(args, check=True, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{args[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise ImageBuildError(f"{' '.join(args)} failed: {exc.stderr.strip()}") from exc
    out: str = result.stdout
    return out


def installed_version(package: str) -> str:
    """The version of an installed Debian package."""
    return _run(["dpkg-query", "-W", "-f=${Version}", package]).strip()


def resolve_kernel_package() -> tuple[str, str]:
    """The versioned kernel package ``linux-image-amd64`` pulls in, and its version.

    ``$CRASHLAB_KERNEL_PACKAGE`` names another ``linux-image-*-amd64`` package.
    """
    package = os.environ.get("CRASHLAB_KERNEL_PACKAGE")
    if not package:
        depends = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
        found = re.search(r"Depends: (linux-image-\S+-amd64)", depends)
        if not found:
            raise ImageBuildError(f"{KERNEL_METAPACKAGE} depends on no linux-image package")
        package = found.group(1)
    policy = _run(["apt-cache", "policy", package])
    candidate = re.search(r"Candidate: (\S+)", policy)
    if not candidate or candidate.group(1) == "(none)":
        raise ImageBuildError(f"apt knows no candidate for {package}; run apt-get update")
    return package, candidate.group(1)


def resolve_inputs(variant: ImageVariant, extra_cmdline: str = "") -> ImageInputs:
    kernel_package, kernel_version = resolve_kernel_package()
    return ImageInputs(
        variant=variant,
        kernel_package=kernel_package,
        kernel_version=kernel_version,
        busybox_version=installed_version("busybox-static"),
        kexec_version=installed_version("kexec-tools"),
        makedumpfile_version=installed_version("makedumpfile"),
        qemu_guest_agent_version=installed_version("qemu-guest-agent"),
        cmdline=kernel_cmdline(variant, extra_cmdline),
        init_script=render_init(variant),
        openssh_client_version=(
            installed_version("openssh-client") if variant.dumps_over_ssh else ""
        ),
        ssh_config=SSH_CONFIG if variant.dumps_over_ssh else "",
    )


def build_image(
    variant: ImageVariant | str,
    *,
    extra_cmdline: str = "",
    cache: Path | None = None,
) -> GuestImage:
    """Return the cached image for ``variant``, building it if an input changed.

    ``extra_cmdline`` is appended to the guest kernel's command line, e.g.
    ``crash_kexec_post_notifiers`` so panic notifiers run before kdump.
    """
    inputs = resolve_inputs(ImageVariant(variant), extra_cmdline)
    return build_from_inputs(inputs, cache or cache_root())


def image_dir(inputs: ImageInputs, cache: Path) -> Path:
    """Where the image built from ``inputs`` lives; it is built when its manifest exists."""
    return cache / "images" / f"{inputs.variant.value}-{inputs.digest()}"


def build_from_inputs(inputs: ImageInputs, cache: Path) -> GuestImage:
    target = image_dir(inputs, cache)
    if (target / "manifest.json").exists():
        return load_image(target)
    kernel_dir = unpack_kernel(inputs.kernel_package, inputs.kernel_version, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        write_image(inputs, kernel_dir, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "manifest.json").exists():
                raise
            # Another process built the same image first; theirs is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    image = load_image(target)
    prune_superseded(image, target.parent)
    return image


def prune_superseded(image: GuestImage, images_dir: Path) -> None:
    """Delete older builds of the same variant and command line: a new input replaced them."""
    for directory in images_dir.glob(f"{image.variant.value}-*"):
        if directory == image.initrd.parent or not (directory / "manifest.json").exists():
            continue
        try:
            old = load_image(directory)
        except (OSError, ValueError, KeyError):
            continue
        if old.variant is image.variant and old.cmdline == image.cmdline:
            shutil.rmtree(directory, ignore_errors=True)


def load_image(directory: Path) -> GuestImage:
    manifest = json.loads((directory / "manifest.json").read_text())
    return GuestImage(
        variant=ImageVariant(manifest["variant"]),
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        cmdline=manifest["cmdline"],
        kernel_release=manifest["kernel_release"],
        digest=manifest["digest"],
    )


def write_image(inputs: ImageInputs, kernel_dir: Path, out: Path) -> None:
    release = (kernel_dir / "release").read_text().strip()
    shutil.copyfile(kernel_dir / "vmlinuz", out / "vmlinuz")
    base = list(base_entries(inputs.init_script, kernel_dir))
    # The crash kernel's initramfs is the base alone (it needs no agent),
    # with ssh where it sends the dump over the network.
    extra: list[CpioEntry] = list(host_binary_entries(["qemu-ga"]))
    if inputs.variant.loads_crash_kernel:
        crash = (
            base + list(ssh_dump_entries(kernel_dir, inputs.ssh_config))
            if inputs.variant.dumps_over_ssh
            else base
        )
        crash_initrd = gzip.compress(cpio_archive(crash), compresslevel=6, mtime=0)
        extra += [
            *host_binary_entries(["kexec"]),
            CpioEntry.directory("boot"),
            CpioEntry.file("boot/vmlinuz", (kernel_dir / "vmlinuz").read_bytes()),
            CpioEntry.file("boot/crash-initrd.img", crash_initrd),
        ]
    (out / "initrd.img").write_bytes(
        gzip.compress(cpio_archive(merge_entries(base + extra)), compresslevel=6, mtime=0)
    )
    manifest = {
        "variant": inputs.variant.value,
        "cmdline": inputs.cmdline,
        "kernel_release": release,
        "digest": inputs.digest(),
        "inputs": dataclasses.asdict(inputs),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    out.chmod(0o755)


def unpack_kernel(package: str, version: str, cache: Path) -> Path:
    """Download the kernel package once and keep only what the image needs.

    Returns a directory with ``vmlinuz``, ``release`` and ``modules/*.ko``.
    """
    target = cache / "kernels" / f"{package}_{version}"
    if _has_modules(target):
        return target
    # Unpacked before the image needed a module it now does: unpack again.
    shutil.rmtree(target, ignore_errors=True)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = next(debs.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"), None)
    if deb is None:
        _run(["apt-get", "download", f"{package}={version}"], cwd=debs)
        deb = next(debs.glob(f"{package}_*.deb"), None)
        if deb is None:
            raise ImageBuildError(f"apt-get download {package} left no .deb in {debs}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp) / "root"
        _run(["dpkg", "-x", str(deb), str(root)])
        staging = Path(tmp) / "kernel"
        (staging / "modules").mkdir(parents=True)
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name.removeprefix("vmlinuz-")
        shutil.copyfile(vmlinuz, staging / "vmlinuz")
        modules = {p.name: p for p in (root / "lib/modules" / release).rglob("*.ko")}
        for name in KERNEL_MODULES:
            if f"{name}.ko" not in modules:
                raise ImageBuildError(f"{package} has no module {name}.ko")
            shutil.copyfile(modules[f"{name}.ko"], staging / "modules" / f"{name}.ko")
        (staging / "release").write_text(release + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target / "release").exists():
            staging.rename(target)
    return target


def _has_modules(kernel_dir: Path) -> bool:
    return (kernel_dir / "release").exists() and all(
        (kernel_dir / "modules" / f"{name}.ko").exists() for name in KERNEL_MODULES
    )


def base_entries(init_script: str, kernel_dir: Path) -> Iterator[CpioEntry]:
    """What both initramfs hold: /init, busybox, makedumpfile and the virtio modules."""
    for name in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        yield CpioEntry.directory(name)
    yield CpioEntry.device("dev/console", major=5, minor=1)
    yield CpioEntry.device("dev/ttyS0", major=4, minor=64)
    yield CpioEntry.file("init", init_script.encode(), mode=0o755)
    yield CpioEntry.file("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    yield CpioEntry.symlink("bin/sh", "busybox")
    for module in GUEST_MODULES:
        data = (kernel_dir / "modules" / f"{module}.ko").read_bytes()
        yield CpioEntry.file(f"lib/modules/{module}.ko", data)
    yield from host_binary_entries(["makedumpfile"])


def ssh_dump_entries(kernel_dir: Path, ssh_config: str) -> Iterator[CpioEntry]:
    """What the kdump-ssh crash kernel adds: the network card, OpenSSH's client, its config."""
    for module in NETWORK_MODULES:
        data = (kernel_dir / "modules" / f"{module}.ko").read_bytes()
        yield CpioEntry.file(f"lib/modules/{module}.ko", data)
    yield from host_binary_entries(["ssh", "scp"])
    # scp runs the ssh at OpenSSH's compiled-in path.
    for name in ("usr", "usr/bin"):
        yield CpioEntry.directory(name)
    yield CpioEntry.symlink("usr/bin/ssh", "/bin/ssh")
    # The client looks its user up (getpwuid) for its home and name.
    for name in ("etc", "etc/ssh"):
        yield CpioEntry.directory(name)
    yield CpioEntry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    yield CpioEntry.file("etc/group", b"root:x:0:\n")
    yield CpioEntry.file("etc/ssh/ssh_config", ssh_config.encode())
    yield CpioEntry.directory("root", mode=0o700)
    yield CpioEntry.directory("root/.ssh", mode=0o700)


def host_binary_entries(names: Iterable[str]) -> Iterator[CpioEntry]:
    """A host binary, placed in /bin, and the libraries ``ldd`` says it links."""
    for name in names:
        path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if path is None:
            raise ImageBuildError(f"{name} is not installed on the host")
        yield CpioEntry.file(f"bin/{name}", Path(path).read_bytes(), mode=0o755)
        for lib in shared_libraries(path):
            for parent in reversed(Path(lib).relative_to("/").parents[:-1]):
                yield CpioEntry.directory(str(parent))
            yield CpioEntry.file(lib.lstrip("/"), Path(lib).read_bytes(), mode=0o755)


def shared_libraries(binary: str) -> list[str]:
    """Absolute paths of the libraries ``ldd`` resolves for ``binary``, loader included."""
    libs = []
    for line in _run(["ldd", binary]).splitlines():
        found = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if found:
            libs.append(found.group(1))
    return libs


def merge_entries(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """Drop repeated paths (shared directories and libraries), keeping the first."""
    seen: dict[str, CpioEntry] = {}
    for entry in entries:
        seen.setdefault(entry.name, entry)
    return list(seen.values())


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive, the format the kernel unpacks."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def file(cls, name: str, data: bytes, mode: int = 0o644) -> CpioEntry:
        return cls(name, 0o100000 | mode, data)

    @classmethod
    def directory(cls, name: str, mode: int = 0o755) -> CpioEntry:
        return cls(name, 0o040000 | mode)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, 0o120777, target.encode())

    @classmethod
    def device(cls, name: str, major: int, minor: int) -> CpioEntry:
        return cls(name, 0o020600, rdev=(major, minor))


def cpio_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A newc archive built in memory, so device nodes need no root and no mknod."""
    chunks: list[bytes] = []
    trailer = CpioEntry("TRAILER!!!", 0)
    for ino, entry in enumerate([*merge_entries(entries), trailer], start=1):
        name = entry.name.encode() + b"\0"
        fields = (
            ino, entry.mode, 0, 0, 1, 0, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        chunks += [header, name, _pad(len(header) + len(name)), entry.data, _pad(len(entry.data))]
    return b"".join(chunks)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)

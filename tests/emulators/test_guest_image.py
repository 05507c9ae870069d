"""The guest image builder: contents, command lines and the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from emulators.guest_image import (
    BUILDER_VERSION,
    CRASH_KERNEL_CMDLINE_FILE,
    FW_CFG_COREDIR,
    FW_CFG_KNOWN_HOSTS,
    FW_CFG_SSH_KEY,
    FW_CFG_SSH_TARGET,
    GUEST_AGENT_PORT,
    READY_MARKER,
    SSH_CONFIG,
    CpioEntry,
    GuestImage,
    ImageVariant,
    build_image,
    cache_root,
    cpio_archive,
    kernel_cmdline,
    render_init,
    resolve_inputs,
)


def test_cpio_archive_is_read_by_cpio(tmp_path: Path) -> None:
    archive = cpio_archive(
        [
            CpioEntry.directory("bin"),
            CpioEntry.file("bin/hello", b"hi\n", mode=0o755),
            CpioEntry.symlink("bin/sh", "hello"),
            CpioEntry.device("console", major=5, minor=1),
        ]
    )
    listing = subprocess.run(
        ["cpio", "-itv"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert "bin/hello" in listing
    assert "bin/sh -> hello" in listing
    assert listing.splitlines()[-1].startswith("crw-------")


@pytest.mark.parametrize(
    ("variant", "present", "absent"),
    [
        (ImageVariant.KDUMP, ["unknown_nmi_panic", "crashkernel=256M"], []),
        (ImageVariant.NO_KDUMP, ["unknown_nmi_panic"], ["crashkernel="]),
        (ImageVariant.NMI_IGNORED, [], ["unknown_nmi_panic", "crashkernel="]),
    ],
)
def test_kernel_cmdline(variant: ImageVariant, present: list[str], absent: list[str]) -> None:
    cmdline = kernel_cmdline(variant)
    assert "console=ttyS0" in cmdline
    assert "panic=0" in cmdline
    for word in present:
        assert word in cmdline
    for word in absent:
        assert word not in cmdline


def test_only_kdump_init_loads_a_crash_kernel() -> None:
    assert "kexec -p" in render_init(ImageVariant.KDUMP)
    assert "kexec -p" not in render_init(ImageVariant.NO_KDUMP)
    assert "echo 0 > /proc/sys/kernel/unknown_nmi_panic" in render_init(ImageVariant.NMI_IGNORED)
    assert CRASH_KERNEL_CMDLINE_FILE in render_init(ImageVariant.KDUMP)
    assert CRASH_KERNEL_CMDLINE_FILE not in render_init(ImageVariant.NO_KDUMP)
    for variant in ImageVariant:
        init = render_init(variant)
        assert READY_MARKER in init
        assert "insmod" in init and "virtio_console" in init and "qemu_fw_cfg" in init
        assert GUEST_AGENT_PORT in init and "qemu-ga -m virtio-serial" in init
        # READY follows the agent's start, so the agent answers once READY is seen.
        assert init.index("\nstart_guest_agent\n") < init.index(f'echo "{READY_MARKER}')


def test_every_input_changes_the_digest() -> None:
    inputs = resolve_inputs(ImageVariant.KDUMP)
    changes: dict[str, object] = {
        "kernel_version": "0.0-test",
        "busybox_version": "0.0-test",
        "kexec_version": "0.0-test",
        "makedumpfile_version": "0.0-test",
        "qemu_guest_agent_version": "0.0-test",
        "init_script": inputs.init_script + "\n",
        "cmdline": inputs.cmdline + " quiet",
        "builder_version": BUILDER_VERSION + "-test",
    }
    digests = {inputs.digest()}
    for field, value in changes.items():
        digests.add(dataclasses.replace(inputs, **{field: value}).digest())  # type: ignore[arg-type]
    assert len(digests) == len(changes) + 1
    assert resolve_inputs(ImageVariant.KDUMP).digest() == inputs.digest()


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty image cache that shares the downloaded kernel package."""
    shared_debs = cache_root() / "debs"
    build_image(ImageVariant.NO_KDUMP)  # makes sure the package is downloaded
    (tmp_path / "debs").symlink_to(shared_debs)
    monkeypatch.setenv("CRASHLAB_CACHE", str(tmp_path))
    return tmp_path


def test_image_is_cached_and_rebuilt_when_an_input_changes(private_cache: Path) -> None:
    first = build_image(ImageVariant.KDUMP)
    assert first.kernel.is_relative_to(private_cache)
    built_at = first.initrd.stat().st_mtime_ns

    again = build_image(ImageVariant.KDUMP)
    assert again == first
    assert again.initrd.stat().st_mtime_ns == built_at

    changed = build_image(ImageVariant.KDUMP, extra_cmdline="crash_kexec_post_notifiers")
    assert changed.digest != first.digest
    assert changed.initrd.parent != first.initrd.parent
    assert changed.cmdline.endswith("crash_kexec_post_notifiers")
    assert first.initrd.stat().st_mtime_ns == built_at


def _cpio_listing(initrd: Path) -> list[str]:
    return subprocess.run(
        f"zcat {initrd} | cpio -it", shell=True, capture_output=True, check=True, text=True
    ).stdout.split()


def test_kdump_image_contents(images: dict[ImageVariant, GuestImage], tmp_path: Path) -> None:
    image = images[ImageVariant.KDUMP]
    listing = _cpio_listing(image.initrd)
    for path in ("init", "bin/busybox", "bin/kexec", "bin/makedumpfile", "bin/qemu-ga",
                 "boot/vmlinuz", "boot/crash-initrd.img", "lib/modules/virtio_blk.ko",
                 "lib/modules/virtio_console.ko", "lib/modules/qemu_fw_cfg.ko",
                 "dev/console"):  # fmt: skip
        assert path in listing
    assert any("libxenctrl" in path for path in listing)
    assert any("libglib-2.0" in path for path in listing)  # qemu-ga's
    assert image.kernel_release.endswith("-amd64")
    no_kdump = _cpio_listing(images[ImageVariant.NO_KDUMP].initrd)
    assert "bin/kexec" not in no_kdump and "bin/qemu-ga" in no_kdump
    # The crash kernel saves the dump and powers off: it has no agent.
    subprocess.run(
        f"zcat {image.initrd} | cpio -id --quiet boot/crash-initrd.img",
        shell=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    crash = _cpio_listing(tmp_path / "boot" / "crash-initrd.img")
    assert "bin/makedumpfile" in crash and "bin/qemu-ga" not in crash


def test_a_new_build_removes_the_one_it_replaces(
    private_cache: Path, images: dict[ImageVariant, GuestImage]
) -> None:
    shipped = images[ImageVariant.NO_KDUMP].initrd.parent
    stale = private_cache / "images" / "no-kdump-0000000000000000"
    shutil.copytree(shipped, stale)
    other_cmdline = build_image(ImageVariant.NO_KDUMP, extra_cmdline="quiet")
    assert stale.exists()  # a different command line does not replace it
    fresh = build_image(ImageVariant.NO_KDUMP)
    assert not stale.exists()
    assert fresh.initrd.exists() and other_cmdline.initrd.exists()


# Debian kdump-tools 1.8.1's kdump_save_core_to_ssh, as the crash kernel must run it.
KDUMP_TOOLS_SSH_COMMANDS = [
    'ssh -i "$SSH_KEY" "$SSH" mkdir -p "$SSH_STAMPDIR"',
    'makedumpfile --dump-dmesg /proc/vmcore "/tmp/dmesg.ssh.$SSH_STAMP"',
    'scp -i "$SSH_KEY" "/tmp/dmesg.ssh.$SSH_STAMP" "$SSH:$SSH_STAMPDIR/dmesg.$SSH_STAMP"',
    "makedumpfile -F -c -d 31 /proc/vmcore;",
    '| ssh -i $SSH_KEY "$SSH" dd "of=$SSH_STAMPDIR/dump-incomplete"',
    'ssh -i "$SSH_KEY" "$SSH" mv "$SSH_STAMPDIR/dump-incomplete" \\\n'
    '            "$SSH_STAMPDIR/dump.$SSH_STAMP"',
]


def test_kdump_ssh_init_sends_the_dump_with_kdump_tools_commands() -> None:
    init = render_init(ImageVariant.KDUMP_SSH)
    positions = [init.index(command) for command in KDUMP_TOOLS_SSH_COMMANDS]
    assert positions == sorted(positions)
    # The connection they share closes once they are done.
    assert '    send_dump_over_ssh\n    ssh -O exit "$SSH"' in init
    assert 'SSH_STAMP=$(date +"%Y%m%d%H%M")' in init
    assert "SSH_STAMPDIR=$KDUMP_COREDIR/$THIS_HOST-$SSH_STAMP" in init
    assert "KDUMP_COREDIR=/var/crash" in init
    for name in (FW_CFG_SSH_KEY, FW_CFG_SSH_TARGET, FW_CFG_KNOWN_HOSTS, FW_CFG_COREDIR):
        assert f"$fw/{name}/raw" in init
        assert name.startswith("opt/") and len(name) <= 55
    assert "for m in failover net_failover virtio_net; do" in init
    assert "ip addr add 10.0.2.15/24 dev eth0" in init
    # The crash kernel sends the dump over ssh instead of writing the dump disk.
    crash_branch = init[init.index("if [ -e /proc/vmcore ]") :].split("\nfi\n")[0]
    assert "    save_dump_over_ssh\n" in crash_branch
    assert "    save_dump\n" not in crash_branch
    for variant in (ImageVariant.KDUMP, ImageVariant.NO_KDUMP, ImageVariant.NMI_IGNORED):
        assert "ssh" not in render_init(variant)


def test_images_without_ssh_keep_their_digests() -> None:
    for variant in (ImageVariant.KDUMP, ImageVariant.NO_KDUMP, ImageVariant.NMI_IGNORED):
        inputs = resolve_inputs(variant)
        assert inputs.openssh_client_version == inputs.ssh_config == ""
        fields = dataclasses.asdict(inputs)
        del fields["openssh_client_version"], fields["ssh_config"]
        text = json.dumps(fields, sort_keys=True, default=str)
        assert inputs.digest() == hashlib.sha256(text.encode()).hexdigest()[:16]
    ssh = resolve_inputs(ImageVariant.KDUMP_SSH)
    assert ssh.openssh_client_version and ssh.ssh_config == SSH_CONFIG
    assert dataclasses.replace(ssh, ssh_config=SSH_CONFIG + "\n").digest() != ssh.digest()
    assert dataclasses.replace(ssh, openssh_client_version="0").digest() != ssh.digest()


def test_ssh_config_shares_one_connection(tmp_path: Path) -> None:
    """The host's own ssh reads the crash kernel's configuration as intended."""
    (tmp_path / "ssh_config").write_text(SSH_CONFIG)
    effective = subprocess.run(
        ["ssh", "-G", "-F", str(tmp_path / "ssh_config"), "root@10.0.2.100"],
        capture_output=True, check=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    for line in ("controlmaster auto", "controlpersist yes", "batchmode yes",
                 "stricthostkeychecking true", "userknownhostsfile /root/.ssh/known_hosts",
                 "serveraliveinterval 10"):  # fmt: skip
        assert line in effective
    assert any(line.startswith("controlpath /tmp/ssh-") for line in effective)


def test_kdump_ssh_image_contents(images: dict[ImageVariant, GuestImage], tmp_path: Path) -> None:
    image = images[ImageVariant.KDUMP_SSH]
    listing = _cpio_listing(image.initrd)
    assert "boot/crash-initrd.img" in listing and "bin/kexec" in listing
    assert "bin/ssh" not in listing  # only the crash kernel sends the dump
    subprocess.run(
        f"zcat {image.initrd} | cpio -id --quiet boot/crash-initrd.img",
        shell=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    crash_initrd = tmp_path / "boot" / "crash-initrd.img"
    crash = _cpio_listing(crash_initrd)
    for path in ("bin/ssh", "bin/scp", "usr/bin/ssh", "etc/passwd", "etc/group",
                 "etc/ssh/ssh_config", "root/.ssh", "lib/modules/failover.ko",
                 "lib/modules/net_failover.ko", "lib/modules/virtio_net.ko",
                 "bin/makedumpfile"):  # fmt: skip
        assert path in crash
    assert any("libcrypto" in path for path in crash)  # ssh's
    assert "bin/qemu-ga" not in crash
    config = subprocess.run(
        f"zcat {crash_initrd} | cpio -i --quiet --to-stdout etc/ssh/ssh_config",
        shell=True, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert config == SSH_CONFIG

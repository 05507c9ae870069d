"""The guest image builder: contents, command lines and the cache."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from emulators.guest_image import (
    BUILDER_VERSION,
    READY_MARKER,
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
    for variant in ImageVariant:
        assert READY_MARKER in render_init(variant)


def test_every_input_changes_the_digest() -> None:
    inputs = resolve_inputs(ImageVariant.KDUMP)
    changes: dict[str, object] = {
        "kernel_version": "0.0-test",
        "busybox_version": "0.0-test",
        "kexec_version": "0.0-test",
        "makedumpfile_version": "0.0-test",
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


def test_kdump_image_contents(images: dict[ImageVariant, GuestImage]) -> None:
    image = images[ImageVariant.KDUMP]
    listing = subprocess.run(
        f"zcat {image.initrd} | cpio -it", shell=True, capture_output=True, check=True, text=True
    ).stdout.split()
    for path in ("init", "bin/busybox", "bin/kexec", "bin/makedumpfile", "boot/vmlinuz",
                 "boot/crash-initrd.img", "lib/modules/virtio_blk.ko", "dev/console"):  # fmt: skip
        assert path in listing
    assert any("libxenctrl" in path for path in listing)
    assert image.kernel_release.endswith("-amd64")
    assert "bin/kexec" not in subprocess.run(
        f"zcat {images[ImageVariant.NO_KDUMP].initrd} | cpio -it",
        shell=True, capture_output=True, check=True, text=True,
    ).stdout.split()  # fmt: skip


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

#!/bin/sh
# Build a kdump guest with plain OS tools, independently of crashlab's image builder:
# a Debian kernel (apt-get download, dpkg -x) and a busybox initramfs made with cpio.
#
#   tests/scenarios/external_guest.sh OUT_DIR
#
# OUT_DIR receives vmlinuz, initrd.img (gzip'd newc cpio) and release (the kernel's
# uname -r). The guest loads a crash kernel with kexec -p at boot; after a panic the
# crash kernel writes "makedumpfile -F" output to the raw disk /dev/vda and powers off.
# Console lines: "external-guest: up kernel=... crash_loaded=1", then after the panic
# "external-guest: dump saved" or "external-guest: dump failed rc=N".
set -eu

out=$(mkdir -p "$1" && cd "$1" && pwd)
work="$out/work"
rm -rf "$work"
mkdir -p "$work/debs"

package=${EXTERNAL_GUEST_KERNEL_PACKAGE:-$(apt-cache depends linux-image-amd64 |
    sed -n 's/^ *Depends: \(linux-image-.*-amd64\)$/\1/p' | head -n 1)}
[ -n "$package" ] || { echo "no linux-image-*-amd64 package found" >&2; exit 1; }
(cd "$work/debs" && apt-get download -q "$package" >/dev/null)
dpkg -x "$work"/debs/"$package"_*.deb "$work/kernel"
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-*)
release=${vmlinuz##*/vmlinuz-}

# The crash kernel's initramfs: init, busybox, makedumpfile, virtio disk modules.
root="$work/crash-root"
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/modules"
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
for module in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    found=$(find "$work/kernel/lib/modules/$release" -name "$module.ko")
    [ -n "$found" ] || { echo "$package has no $module.ko" >&2; exit 1; }
    cp "$found" "$root/modules/"
    echo "$module" >> "$root/modules/order"
done

copy_binary() {  # copy_binary ROOT PROGRAM: the program and every library ldd lists
    cp "$(command -v "$2")" "$1/bin/"
    for lib in $(ldd "$(command -v "$2")" | grep -o '/[^ ]*'); do
        cp --parents -L "$lib" "$1"
    done
}
PATH=$PATH:/usr/sbin:/sbin
copy_binary "$root" makedumpfile

cat > "$root/init" <<'EOF'
#!/bin/sh
# No /dev/console in this cpio (no mknod needed to build it): mount devtmpfs first.
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
for module in $(cat /modules/order); do insmod "/modules/$module.ko"; done

if [ -e /proc/vmcore ]; then
    n=0
    while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.2; n=$((n + 1)); done
    makedumpfile -F -c -d 31 /proc/vmcore > /dev/vda
    rc=$?
    sync
    if [ $rc = 0 ]; then echo "external-guest: dump saved"; else echo "external-guest: dump failed rc=$rc"; fi
    poweroff -f
fi

if [ -x /bin/kexec ]; then
    kexec -p /boot/vmlinuz --initrd=/boot/crash.img \
        --append="console=ttyS0 irqpoll nr_cpus=1 reset_devices"
fi
echo "external-guest: up kernel=$(uname -r) crash_loaded=$(cat /sys/kernel/kexec_crash_loaded)"
while :; do sleep 3600; done
EOF
chmod 755 "$root/init"

pack() {  # pack DIR FILE: a gzip'd newc cpio of DIR
    (cd "$1" && find . | cpio -o -H newc --quiet) | gzip -6 > "$2"
}
pack "$root" "$work/crash.img"

# The guest's own initramfs: the same, plus kexec, the kernel and the crash initramfs.
cp -a "$root" "$work/root"
copy_binary "$work/root" kexec
mkdir -p "$work/root/boot"
cp "$vmlinuz" "$work/root/boot/vmlinuz"
cp "$work/crash.img" "$work/root/boot/crash.img"
pack "$work/root" "$out/initrd.img"

cp "$vmlinuz" "$out/vmlinuz"
echo "$release" > "$out/release"
rm -rf "$work"

#!/usr/bin/env bash
# The parts of the xen-demo image that depend only on Debian, built once and cached:
#   CACHE/xen.elf          Xen 4.17 (gunzipped: a multiboot1 ELF that QEMU's -kernel loads)
#   CACHE/vmlinuz          the Debian 6.1 kernel (dom0 and the PV guests)
#   CACHE/initrd.img       dom0's initramfs (virtio_blk, ext4)
#   CACHE/busybox          busybox-static, for the guests' initramfs
#   CACHE/rootfs/          debootstrap minbase bookworm + kernel modules + xen-utils-4.17
# Usage: dom0-base.sh CACHE KERNEL_VERSION
# A finished step leaves a stamp; a run after an interruption redoes only unfinished steps.
set -euo pipefail
CACHE=$1
KVER=$2
export DEBIAN_FRONTEND=noninteractive
# Mirrors come from this machine's own apt configuration.
SRC=/etc/apt/sources.list.d/debian.sources
MIRROR=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$SRC" 2>/dev/null || true)
SECURITY=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' "$SRC" 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
mkdir -p "$CACHE"
cd "$CACHE"

for p in debootstrap cpio; do
    command -v $p >/dev/null || apt-get install -y -q --no-install-recommends $p
done

if [ ! -e debs.stamp ]; then
    rm -rf debs ext
    mkdir -p debs ext
    (cd debs && apt-get download -q xen-hypervisor-4.17-amd64 "linux-image-$KVER" busybox-static)
    for d in debs/*.deb; do dpkg-deb -x "$d" ext; done
    gunzip -c ext/boot/xen-4.17-amd64.gz > xen.elf
    cp "ext/boot/vmlinuz-$KVER" vmlinuz
    cp ext/bin/busybox busybox
    rm -rf debs
    touch debs.stamp
fi

# Unmounts what a chroot step left mounted in rootfs (never delete through a bind mount of /dev).
unmount_chroot() {
    for m in dev/pts dev sys proc; do
        if mountpoint -q "rootfs/$m"; then umount "rootfs/$m" || umount -l "rootfs/$m"; fi
    done
}

if [ ! -e rootfs.stamp ]; then
    [ ! -d rootfs ] || unmount_chroot
    rm -rf --one-file-system rootfs
    debootstrap --variant=minbase bookworm rootfs "$MIRROR"
    rm -f rootfs/etc/apt/sources.list
    cat > rootfs/etc/apt/sources.list.d/debian.sources <<SOURCES
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    printf '#!/bin/sh\nexit 101\n' > rootfs/usr/sbin/policy-rc.d
    chmod +x rootfs/usr/sbin/policy-rc.d
    mount -t proc proc rootfs/proc
    mount -t sysfs sysfs rootfs/sys
    mount --bind /dev rootfs/dev
    mount --bind /dev/pts rootfs/dev/pts
    trap unmount_chroot EXIT
    chroot rootfs sh -c "apt-get update -q && apt-get install -y -q --no-install-recommends \
        linux-image-$KVER initramfs-tools kmod xen-utils-4.17 xenstore-utils xen-utils-common \
        procps iproute2 util-linux e2fsprogs && apt-get clean"
    unmount_chroot
    trap - EXIT
    rm -rf rootfs/var/lib/apt/lists/* rootfs/usr/share/doc rootfs/usr/share/man
    cp "rootfs/boot/initrd.img-$KVER" initrd.img
    touch rootfs.stamp
fi
ls -la "$CACHE"

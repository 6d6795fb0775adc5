#!/bin/busybox sh
# /init of the xen-demo PV guests' initramfs. The disk (xvda) is a clone of the golden VDI: an
# ext4 file system in its first FS_MIB MiB, then a scratch area. Round 1 writes a marker file,
# a pattern in the scratch area and discards part of it; round 2 (a reboot) finds all of it
# again, measures dd throughput and writes numbered blocks while dom0 restarts parallaxd.
# Rounds "bench" and "bench-par" only measure. Each result is one line "XEN-GUEST NAME: ..." on hvc0.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
NAME=guest; ROUND=1; FS_MIB=64; WRITES=150; QUEUES=
for a in $(cat /proc/cmdline); do
    case "$a" in
        parallax.name=*) NAME="${a#parallax.name=}" ;;
        parallax.round=*) ROUND="${a#parallax.round=}" ;;
        parallax.fs_mib=*) FS_MIB="${a#parallax.fs_mib=}" ;;
        parallax.writes=*) WRITES="${a#parallax.writes=}" ;;
        parallax.queues=*) QUEUES="${a#parallax.queues=}" ;;
    esac
done
say() { echo "XEN-GUEST $NAME: $*"; }
bye() { say "$1"; sync; poweroff -f; }
# blkfront uses one queue per vCPU (at most 4 and the backend's multi-queue-max-queues)
# unless parallax.queues caps it; busybox insmod does not read module options off the
# kernel command line, so the cap is passed here.
for m in $(cat /modules.order); do
    case "$m" in
        xen_blkfront|xen-blkfront) opts=${QUEUES:+max_queues=$QUEUES} ;;
        *) opts= ;;
    esac
    insmod /lib/modules/$m.ko $opts || say "insmod $m failed"
done
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
[ -b /dev/xvda ] || bye "FAIL no /dev/xvda"
say "xvda $(cat /sys/block/xvda/size) sectors, discard max $(cat /sys/block/xvda/queue/discard_max_bytes) bytes"
say "QUEUES $(ls /sys/block/xvda/mq | wc -l) on $(grep -c ^processor /proc/cpuinfo) vCPU(s)"

# The scratch area: 8 MiB of the guest's name repeated, the second half then discarded.
pattern() { yes "$NAME" | head -c $((8 << 20)); }
SEEK=$FS_MIB
check_scratch() {
    # Read from the disk, not from what the guest's page cache kept of its own writes.
    sync; echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/xvda bs=1M skip=$SEEK count=4 2>/dev/null | cmp -s - /tmp/pattern-a || return 1
    dd if=/dev/xvda bs=1M skip=$((SEEK + 4)) count=4 2>/dev/null | cmp -s - /tmp/zeros || return 2
}
pattern | head -c $((4 << 20)) > /tmp/pattern-a
head -c $((4 << 20)) /dev/zero > /tmp/zeros

# Throughput over the ring: a full read of the file system area, a write of the scratch area.
measure() {
    t0=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/xvda of=/dev/null bs=1M count=$FS_MIB 2>/dev/null
    t1=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/zero of=/dev/xvda bs=1M seek=$SEEK count=8 conv=fsync 2>/dev/null
    t2=$(cut -d' ' -f1 /proc/uptime)
    say "DD read $FS_MIB MiB in $(echo "$t1 $t0" | awk '{printf "%.2f", $1-$2}') s, write 8 MiB in $(echo "$t2 $t1" | awk '{printf "%.2f", $1-$2}') s"
}
# The same amounts, as two dd at once, each on half: blk-mq gives each the queue of the
# vCPU it runs on, so a multi-queue disk is used in parallel.
measure_parallel() {
    half=$((FS_MIB / 2))
    t0=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/xvda of=/dev/null bs=1M count=$half 2>/dev/null & a=$!
    dd if=/dev/xvda of=/dev/null bs=1M skip=$half count=$half 2>/dev/null & b=$!
    wait $a $b
    t1=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/zero of=/dev/xvda bs=1M seek=$SEEK count=4 conv=fsync 2>/dev/null & a=$!
    dd if=/dev/zero of=/dev/xvda bs=1M seek=$((SEEK + 4)) count=4 conv=fsync 2>/dev/null & b=$!
    wait $a $b
    t2=$(cut -d' ' -f1 /proc/uptime)
    say "DD read $FS_MIB MiB in $(echo "$t1 $t0" | awk '{printf "%.2f", $1-$2}') s, write 8 MiB in $(echo "$t2 $t1" | awk '{printf "%.2f", $1-$2}') s"
}
case "$ROUND" in
    bench) measure; bye "DONE" ;;
    bench-par) measure_parallel; bye "DONE" ;;
esac

mkdir -p /mnt
mount -t ext4 /dev/xvda /mnt || bye "FAIL cannot mount xvda"
others=$(ls /mnt | grep '^marker-' | grep -v "^marker-$NAME\$" | tr '\n' ' ')
[ -z "$others" ] || say "FAIL markers of other guests: $others"
if [ "$ROUND" = 1 ]; then
    [ -e /mnt/marker-$NAME ] && say "FAIL marker present before the first boot"
    echo "$NAME" > /mnt/marker-$NAME
    sync
    [ "$(cat /mnt/marker-$NAME)" = "$NAME" ] || say "FAIL marker reads back wrong"
    umount /mnt
    pattern | dd of=/dev/xvda bs=1M seek=$SEEK conv=fsync 2>/dev/null || say "FAIL pattern write"
    blkdiscard -o $(((SEEK + 4) << 20)) -l $((4 << 20)) /dev/xvda || say "FAIL blkdiscard"
    check_scratch || say "FAIL scratch area wrong after discard (check $?)"
    say "MARKER-WRITTEN"
else
    [ "$(cat /mnt/marker-$NAME 2>/dev/null)" = "$NAME" ] || say "FAIL marker lost"
    umount /mnt
    check_scratch || say "FAIL scratch area wrong after reboot (check $?)"
    say "MARKER-FOUND"
    measure
    # Numbered 4 KiB blocks, each written with fsync, while dom0 restarts parallaxd under us:
    # every one must read back afterwards.
    FIRST=$(((SEEK + 8) * 256))
    say "WRITER-STARTED"
    i=0
    while [ $i -lt $WRITES ]; do
        printf '%s-%05d\n' "$NAME" $i | dd of=/dev/xvda bs=4096 seek=$((FIRST + i)) conv=sync,fsync 2>/dev/null ||
            say "FAIL write of block $i"
        i=$((i + 1))
    done
    sync; echo 3 > /proc/sys/vm/drop_caches
    i=0; bad=0
    while [ $i -lt $WRITES ]; do
        got=$(dd if=/dev/xvda bs=4096 skip=$((FIRST + i)) count=1 2>/dev/null | head -n 1)
        [ "$got" = "$(printf '%s-%05d' "$NAME" $i)" ] || bad=$((bad + 1))
        i=$((i + 1))
    done
    [ $bad = 0 ] || say "FAIL $bad of $WRITES blocks written across the restart read back wrong"
    say "WRITER wrote $WRITES blocks across the restart, $bad wrong"
fi
bye "DONE"

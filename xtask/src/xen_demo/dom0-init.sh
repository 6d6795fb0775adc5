#!/bin/bash
# PID 1 of the xen-demo dom0 (kernel command line: init=/usr/sbin/xen-demo-init).
# Starts xenstored and xenconsoled, starts parallaxd --xen on the store disk (/dev/vdb), boots
# the PV guests of /demo/demo.conf with `xl create`, twice (the second boot finds the first's
# data), prints each guest's console, stops parallaxd and powers off. Every line meant for the
# host starts with "XEN-DEMO:"; the host (cargo xtask xen-demo) reads them from the serial port.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
hostname dom0
exec </dev/null >/dev/hvc0 2>&1

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "XEN-DEMO: $*"; }
finish() {
    say "DONE $1"
    sync
    # Power off, then wait with shell builtins only: the disks go away during the power-off,
    # and an external `sleep` that can no longer be loaded would end PID 1 (a kernel panic).
    mkfifo /run/hold
    exec 3<>/run/hold
    echo o > /proc/sysrq-trigger
    while :; do read -r -t 60 -u 3 _; done
}

. /demo/demo.conf
say "dom0 kernel up at $(up) s; hypervisor=$(cat /sys/hypervisor/type 2>/dev/null)"
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs; do
    modprobe $m || say "modprobe $m failed"
done
grep -q xenfs /proc/mounts || mount -t xenfs xenfs /proc/xen
mkdir -p /var/log/xen/console /var/lib/xen /run/xen /run/lock
/etc/init.d/xen start >/tmp/xen-start.log 2>&1 || { cat /tmp/xen-start.log; finish fail; }
if lsmod | grep -q '^xen_blkback'; then
    say "the kernel's xen-blkback is loaded: it would fight parallaxd for backend/vbd"
    finish fail
fi
say "dom0 ready at $(up) s (xenstored: $(pgrep -c xenstored), xenconsoled: $(pgrep -c xenconsoled))"

STARTS=0
start_parallaxd() {
    STARTS=$((STARTS + 1))
    PARALLAXD_LOG=/var/log/parallaxd-$STARTS.log
    PARALLAX_LOG=${PARALLAX_LOG:-info} /demo/parallaxd --xen --store /dev/vdb >$PARALLAXD_LOG 2>&1 &
    PARALLAXD_PID=$!
    # Ready once it logs so (after the Xen backend, the control socket and everything else).
    if ! timeout 60 sh -c "tail -n +1 -f $PARALLAXD_LOG | grep -q -m1 'parallaxd ready'"; then
        say "parallaxd did not start:"; cat $PARALLAXD_LOG; finish fail
    fi
    say "parallaxd $PARALLAXD_PID serving at $(up) s"
}
stop_parallaxd() {
    kill -TERM $PARALLAXD_PID
    wait $PARALLAXD_PID
    say "parallaxd exited with $?"
}

# Once every guest of the round is writing, stop parallaxd and start a new one: the guests'
# rings must be resumed, not closed, and their writes go on.
restart_under_guests() {
    local name
    for name in $GUESTS; do
        timeout 600 sh -c "tail -n +1 -F /var/log/xen/console/guest-$name.log 2>/dev/null | grep -q -m1 WRITER-STARTED" ||
            say "$name never said WRITER-STARTED"
    done
    say "restarting parallaxd under writing guests at $(up) s"
    local t0=$(up)
    stop_parallaxd
    start_parallaxd
    say "parallaxd restarted in $(echo "$(up) $t0" | awk '{printf "%.1f", $1-$2}') s"
    local n
    for name in $GUESTS; do
        local line
        line=$(timeout 60 sh -c "tail -n +1 -f $PARALLAXD_LOG | grep -m1 'vbd/$(xl domid $name)/.*resumed the ring'") &&
            say "parallaxd resumed the ring of $name: ${line##*left connected, }"
    done
}

# One round: every guest booted at once; each powers itself off when done.
round() {
    local r=$1 restart=$2 pids=() name
    for name in $GUESTS; do
        rm -f /var/log/xen/console/guest-$name.log
        say "xl create $name round $r at $(up) s"
        ( t0=$(up); xl create -F /demo/$name-round$r.cfg >/tmp/xl-$name.log 2>&1; rc=$?
          say "$name round $r: xl create -F exited $rc after $(echo "$(up) $t0" | awk '{printf "%.1f", $1-$2}') s" ) &
        pids+=($!)
    done
    [ -z "$restart" ] || restart_under_guests
    wait "${pids[@]}"
    for name in $GUESTS; do
        sed "s/^/XEN-DEMO: console $name round $r: /" /var/log/xen/console/guest-$name.log 2>/dev/null | tr -d '\r'
        sed "s/^/XEN-DEMO: xl $name round $r: /" /tmp/xl-$name.log
    done
}

start_parallaxd
# The same guest alone, once on parallaxd and once on the kernel's blkback serving a raw copy
# of the golden image (/dev/vdd, the same kind of disk as the store): dd throughput to compare.
bench() {
    local tag=$1
    rm -f /var/log/xen/console/guest-bench.log
    sync; echo 3 > /proc/sys/vm/drop_caches
    say "bench on $tag at $(up) s"
    xl create -F /demo/bench-$tag.cfg >/tmp/xl-bench.log 2>&1 || { say "bench $tag: xl create failed"; cat /tmp/xl-bench.log; }
    sed "s/^/XEN-DEMO: console bench-$tag: /" /var/log/xen/console/guest-bench.log 2>/dev/null | tr -d '\r'
}

round 1
round 2 restart
if [ -n "$COMPARE" ]; then
    for tag in $BENCH_PARALLAX; do bench $tag; done
fi
stop_parallaxd
if [ -n "$COMPARE" ]; then
    # modprobe would refuse (the install line that keeps blkback away); insmod by path does not.
    insmod "$(modinfo -n xen-blkback)" && say "xen-blkback loaded for the comparison"
    for tag in $BENCH_BLKBACK; do bench $tag; done
fi
for n in $(seq $STARTS); do
    sed "s/^/XEN-DEMO: parallaxd-$n: /" /var/log/parallaxd-$n.log
done
finish ok

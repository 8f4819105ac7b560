#!/bin/sh
# Runs as PID 1 of a fresh PID + mount namespace (see sysbox.py). Builds an
# in-memory overlay of / and execs systemd inside it, so nothing systemd writes
# (tmpfiles wiping /tmp included) reaches the real machine: writes land in
# a tmpfs upper layer.
set -eu
base="$1"
mount --make-rprivate /
mount -t tmpfs -o size="${SYSBOX_TMPFS_SIZE:-6g}" sysbox "$base"
mkdir -p "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
r="$base/root"
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
# Its own /dev/shm, as a machine of its own has: two test hosts must not find
# each other's shared memory (vLLM takes ranks that do for one node, and talks
# to them over unix sockets in a /tmp they do not share).
mount -t tmpfs -o mode=1777,nosuid,nodev,size=2g shm "$r/dev/shm"
mount -t tmpfs -o mode=755 tmpfs "$r/run"
# Directories shared both ways with the machine, at the same path inside (the
# tests' work root: worker sockets created inside are reached from outside).
for shared in ${SYSBOX_SHARE:-}; do
  mkdir -p "$shared" "$r$shared"
  mount --bind "$shared" "$r$shared"
done
# This machine's Python lives under /root (pyenv): let the unprivileged
# accounts of the host (gateway, workers) reach it. Only the overlay changes.
chmod 755 "$r/root"
# /tmp stays the overlay's view of the real /tmp (a checkout may live there),
# and systemd-tmpfiles must not empty it at boot: mask tmp.conf inside.
# Deletions would only be whiteouts in the overlay, never on the real disk.
mkdir -p "$r/etc/tmpfiles.d"
: > "$r/etc/tmpfiles.d/tmp.conf"
mkdir -p "$r/.oldroot"
cd "$r"
pivot_root . .oldroot
umount -l /.oldroot
# basic.target, not the machine's default: whatever this machine has enabled
# (a database, a web server) must not start in every test host, where it would
# fight the others for ports in the shared network namespace. Tests start what
# they need.
exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd --system --log-target=kmsg --unit=basic.target

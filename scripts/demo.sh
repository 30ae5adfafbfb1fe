#!/usr/bin/env bash
# make demo: build a sample image with real tools, import it, mount it, write to it, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERFS=${LAYERFS:-$PWD/.venv/bin/layerfs}
work=$PWD/demo-work
export LAYERFS_STORE=$work/store
mnt=$work/mnt

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then "$LAYERFS" umount "$mnt" 2>/dev/null || umount "$mnt" || true; fi
}
trap cleanup EXIT

rm -rf "$work"
mkdir -p "$work" "$mnt"

step "Build a two-layer busybox image with umoci (no network)"
run scripts/make-sample-image.sh "$work/layout" latest

step "Import it into the store (digests verified, layers and files deduplicated)"
run "$LAYERFS" import "oci:$work/layout:latest" --tag sample:latest
run "$LAYERFS" import "oci:$work/layout:latest" --tag sample:latest
run "$LAYERFS" images
run "$LAYERFS" layers sample:latest
run "$LAYERFS" history sample:latest

if "$LAYERFS" mount --help >/dev/null 2>&1; then
    step "Mount the image with a writable upper"
    run "$LAYERFS" mount sample:latest "$mnt" --name demo
    run ls -l "$mnt" "$mnt/srv/www"
    run cat "$mnt/etc/motd"
    step "Write to it: copy-up, a new file, a deletion"
    echo "changed in the mount" >>"$mnt/etc/motd"
    echo "new" >"$mnt/srv/www/new.html"
    rm "$mnt/srv/www/robots.txt"
    run cat "$mnt/etc/motd"
    run "$LAYERFS" diff "$mnt"
    run "$LAYERFS" umount "$mnt"
else
    step "Unpack the image and stack a writable upper over it with layerfs overlay"
    run "$LAYERFS" unpack sample:latest "$work/rootfs"
    mkdir -p "$work/upper" "$work/work"
    run "$LAYERFS" overlay -o "lowerdir=$work/rootfs,upperdir=$work/upper,workdir=$work/work" "$mnt"
    run ls -l "$mnt" "$mnt/srv/www"
    step "Write to it: copy-up of /etc/motd, a new file, a deletion (whiteout)"
    echo "changed in the mount" >>"$mnt/etc/motd"
    echo "new" >"$mnt/srv/www/new.html"
    rm "$mnt/srv/www/robots.txt"
    run cat "$mnt/etc/motd"
    run ls -l "$mnt/srv/www"
    step "The upper holds only the changes, in overlayfs' own format"
    run find "$work/upper" -printf '%M %p\n'
    run umount "$mnt"
    step "The image itself is untouched"
    run cat "$work/rootfs/etc/motd"
fi
echo
echo "demo finished; everything is under $work"

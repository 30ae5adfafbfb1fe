#!/usr/bin/env bash
# make demo: build a sample image with real tools, import it, mount it, write to it, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERFS=${LAYERFS:-$PWD/.venv/bin/layerfs}
work=$PWD/demo-work
export LAYERFS_STORE=$work/store
mnt=$work/mnt

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() {
    local out="\$" a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '$a'"; fi
    done
    printf '%s\n' "$out"
    "$@"
}

cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then
        "$LAYERFS" umount "$mnt" 2>/dev/null || umount "$mnt" || true
    fi
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

step "Mount the image: its layers from the store under a writable upper named 'demo'"
run "$LAYERFS" mount sample:latest "$mnt" --name demo
run "$LAYERFS" ps
run ls -l "$mnt" "$mnt/srv/www"
run cat "$mnt/etc/motd"
run "$LAYERFS" which sample:latest /srv/www/index.html

step "Write to it: copy-up of /etc/motd, a new file, a deletion (whiteout)"
printf '$ echo "changed in the mount" >> %s\n' "$mnt/etc/motd"
echo "changed in the mount" >>"$mnt/etc/motd"
printf '$ echo new > %s\n' "$mnt/srv/www/new.html"
echo "new" >"$mnt/srv/www/new.html"
run rm "$mnt/srv/www/robots.txt"
run cat "$mnt/etc/motd"
run "$LAYERFS" diff demo

step "The upper holds only the changes, in overlayfs' own format"
run find "$LAYERFS_STORE/containers/demo/upper" -printf '%M %p\n'

step "Commit the changes as a new layer and image, then unmount"
run "$LAYERFS" commit demo sample:changed -m "demo changes"
run "$LAYERFS" umount "$mnt"
run "$LAYERFS" history sample:changed

step "Mount the committed image read-only: the changes are in it"
run "$LAYERFS" mount sample:changed "$mnt" --ro
run ls -l "$mnt/srv/www"
run cat "$mnt/etc/motd"
run "$LAYERFS" umount "$mnt"

step "Export it as an OCI archive that skopeo and umoci read"
run "$LAYERFS" export sample:changed "oci-archive:$work/sample-changed.tar:changed"
run skopeo inspect "oci-archive:$work/sample-changed.tar:changed" --format '{{.Digest}} {{len .Layers}} layers'
echo
echo "demo finished; everything is under $work"

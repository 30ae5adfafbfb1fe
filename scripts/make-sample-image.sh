#!/usr/bin/env bash
# Build a small busybox-based sample image with umoci into an OCI layout (no network, ~1 s).
#
#   scripts/make-sample-image.sh LAYOUT_DIR [TAG]     (TAG defaults to "latest")
#
# Two layers: busybox-static with applet links and /etc files, then a small "app" layer
# (/srv/www, a setuid-free script, a symlink), so `layerfs layers`, `diff` and `which`
# have something to show. Import it with:  layerfs import oci:LAYOUT_DIR:TAG
set -euo pipefail

usage() { echo "usage: $0 LAYOUT_DIR [TAG]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
layout=$1
tag=${2:-latest}

for tool in umoci; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is not installed (make deps)" >&2; exit 1; }
done
busybox=/bin/busybox
[[ -x $busybox ]] || { echo "$0: $busybox missing (apt-get install busybox-static)" >&2; exit 1; }

# umoci unpack needs root to set owners; unprivileged users get a rootless unpack.
unpack_opts=()
[[ $(id -u) -eq 0 ]] || unpack_opts=(--rootless)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

[[ -f $layout/index.json ]] || umoci init --layout "$layout"
umoci new --image "$layout:$tag"

# Layer 1: busybox and a minimal /etc.
umoci unpack "${unpack_opts[@]}" --image "$layout:$tag" "$work/bundle"
root=$work/bundle/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root"
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
cp "$busybox" "$root/bin/busybox"
for applet in sh ls cat echo mkdir rm cp mv ln touch grep sed find; do
    ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
printf 'Welcome to the layerfs sample image.\n' >"$root/etc/motd"
umoci repack --history.created_by "make-sample-image.sh: busybox base" \
    --image "$layout:$tag" "$work/bundle"
rm -rf "$work/bundle"

# Layer 2: a tiny web root and a script.
umoci unpack "${unpack_opts[@]}" --image "$layout:$tag" "$work/bundle"
root=$work/bundle/rootfs
mkdir -p "$root/srv/www" "$root/usr/local/bin"
printf '<h1>hello from layerfs</h1>\n' >"$root/srv/www/index.html"
printf 'User-agent: *\nDisallow:\n' >"$root/srv/www/robots.txt"
printf '#!/bin/sh\necho "hello from $(cat /etc/motd)"\n' >"$root/usr/local/bin/hello"
chmod 755 "$root/usr/local/bin/hello"
ln -s /srv/www "$root/www"
umoci repack --history.created_by "make-sample-image.sh: app files" \
    --image "$layout:$tag" "$work/bundle"

umoci config --config.cmd /bin/sh --config.env PATH=/usr/local/bin:/bin \
    --config.workingdir / --author "layerfs sample" --image "$layout:$tag"
echo "built oci:$layout:$tag"

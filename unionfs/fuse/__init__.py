"""unionfs.fuse: the FUSE edge, ours end to end (no libfuse session, no pyfuse3).

- `protocol.py`: codecs for every request and reply of the kernel's <linux/fuse.h>; no I/O.
- `session.py`: INIT negotiated here; the one trio loop reading /dev/fuse, each reply once.
- `handlers.py`: requests to UnionFS calls; `errno_of`, where a failure becomes an errno.
- `passthrough.py`: host files registered on our device fd for kernel passthrough.
- `policy.py`: what the handlers honour of fuse-overlayfs' options.
- `mount.py`: FUSE mount options; mount(2) as root, fusermount3's fd hand-over otherwise.
"""

"""unionfs.fuse: the FUSE edge, ours end to end (no libfuse session, no pyfuse3).

- `protocol.py`: codecs for every request and reply of the kernel's <linux/fuse.h>; no I/O.
"""

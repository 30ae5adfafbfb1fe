"""unionfs: an overlayfs-compatible FUSE daemon stacking read-only layers under a writable upper."""

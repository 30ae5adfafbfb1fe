"""Shared pytest set-up: skip helpers that say why, and Hypothesis profiles."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

# CI runs exactly the examples a developer ran (derandomize); deadlines are meaningless on a
# loaded 2-core machine, and FUSE-backed tests are slow per example.
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def require_root() -> None:
    """Skip the calling test unless we are root (kernel overlay mounts, devices, trusted.*)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (kernel overlay mounts, device nodes, trusted.* xattrs)")


def require_tool(name: str) -> str:
    """Skip unless `name` is on PATH; return its path."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make deps installs it)")
    return path


def require_fuse() -> None:
    """Skip unless a FUSE mount can really be made here: /dev/fuse and fusermount3."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is absent (no FUSE in this kernel or container)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("/dev/fuse is not readable and writable by this user")
    require_tool("fusermount3")


def require_kernel_overlay() -> None:
    """Skip unless the kernel's overlay filesystem is available and we may mount it."""
    require_root()
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1] == "overlay" for line in f if line.strip()):
            if shutil.which("modprobe"):
                os.system("modprobe overlay >/dev/null 2>&1")
            with open("/proc/filesystems") as g:
                if not any(line.split()[-1] == "overlay" for line in g if line.strip()):
                    pytest.skip("kernel overlayfs is not available")


# Session fixtures with the real-tool test images, shared by tests/store and tests/mount.
pytest_plugins = ["tests.image_fixtures"]

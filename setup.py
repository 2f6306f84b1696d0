"""Build hook: compile the optional C helpers, and the io_uring binding where liburing is present.

Everything else about the package is in pyproject.toml.  Where
``liburing.h`` cannot be found (or ``PWRITER_NO_URING=1`` is set) the
extension is left out and pwriter uses its thread-pool backend.
"""

import os
import shutil
import subprocess

from setuptools import setup


def _have_liburing() -> bool:
    if os.environ.get("PWRITER_NO_URING"):
        return False
    if shutil.which("pkg-config"):
        done = subprocess.run(["pkg-config", "--exists", "liburing"], check=False)
        if done.returncode == 0:
            return True
    return any(os.path.exists(os.path.join(d, "liburing.h")) for d in ("/usr/include", "/usr/local/include"))


modules = ["pwriter/_native_build.py:ffibuilder"]
if _have_liburing():
    modules.append("pwriter/_uring_build.py:ffibuilder")
setup(cffi_modules=modules)

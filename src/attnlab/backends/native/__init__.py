"""attnlab's native CPU kernels, compiled on first use with the machine's C++ compiler.

The block-sparse flash kernel (``block_flash_cpu.cpp``) is built by
:func:`torch.utils.cpp_extension.load` into torch's extension cache the first time it is
needed (about a minute; later processes load the cached build). Nothing here is imported
eagerly: without a compiler, or with ``ATTNLAB_NATIVE=0`` in the environment,
:func:`block_flash_kernel` returns None, :func:`unavailable_reason` says why, and the
block-flash backend runs on PyTorch's own CPU flash kernel instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("block_flash_cpu.cpp")
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}
_lock = threading.Lock()
_state: dict = {}
log = logging.getLogger("attnlab")


def _capability() -> str:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"
    return cap if cap in _FLAGS else "DEFAULT"


def _is_built(name: str) -> bool:
    """Whether torch's extension cache already holds a build of ``name`` (then loading it is quick)."""
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return any(root.glob(f"*/{name}/{name}.so")) or any(root.glob(f"{name}/{name}.so"))


def _build():
    if os.environ.get("ATTNLAB_NATIVE", "1") == "0":
        raise RuntimeError("disabled by ATTNLAB_NATIVE=0")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    from torch.utils import cpp_extension

    cap = _capability()
    digest = hashlib.sha1(_SOURCE.read_bytes() + torch.__version__.encode() + cap.encode()).hexdigest()[:12]
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={cap}", *_FLAGS.get(cap, [])]
    name = f"attnlab_block_flash_{cap.lower()}_{digest}"
    if not _is_built(name):
        log.warning("attnlab: compiling the native block-sparse CPU kernel (once per machine, about a minute)")
    return cpp_extension.load(name=name, sources=[str(_SOURCE)],
                              extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)


def block_flash_kernel():
    """The compiled block-sparse flash module (``forward``, ``backward``), or None when it
    cannot be built here; the first call compiles it."""
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
            except Exception as err:  # a missing compiler, ninja or BLAS symbol: fall back, say why
                _state["module"] = None
                _state["reason"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                log.warning("attnlab: native kernel unavailable (%s); using PyTorch's CPU flash kernel",
                            _state["reason"])
        return _state["module"]


def unavailable_reason() -> str | None:
    """Why :func:`block_flash_kernel` returned None (None when it has not failed)."""
    return _state.get("reason")


__all__ = ["block_flash_kernel", "unavailable_reason"]

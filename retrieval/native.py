"""ragserve's PLAID search kernels (``plaid_kernels.c``), built with the system C compiler and
called through ctypes.

The C file needs no Python or torch headers, so it compiles in well under a second (colbert-ai's
two torch extensions take about 35 s each). The library goes into
``<cache>/native/plaid_kernels-<hash>.so``, the hash taken over the source, the flags and the
machine, so a changed source is rebuilt and a cache shared between machines of another
architecture is never loaded. It is built for the generic target of the architecture (no
``-march=native``): a cache volume moved to another CPU of the same architecture still works.
Without a compiler (``$CC``, ``cc``, ``gcc``), :func:`load` says why and ``retrieval.plaid``
uses colbert-ai's kernels, or its pure-torch path. An image without a compiler ships the
library prebuilt: ``python -m retrieval.native`` builds it into the package (``_prebuilt/``),
where :func:`load` looks first (``docker/Dockerfile.cpu`` does this, then removes gcc).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SOURCE = Path(__file__).with_name("plaid_kernels.c")
#: where an image build puts the library (``python -m retrieval.native``), looked up before the
#: cache: a container without a compiler still gets the kernels
PREBUILT = Path(__file__).with_name("_prebuilt")
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
MAX_QUERY_VECTORS = 1024  # the kernels' stack buffer
_BUILD_TIMEOUT_S = 120

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class NativeError(RuntimeError):
    """The kernels cannot be built or loaded here (no compiler, a failed build)."""


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    raise NativeError("no C compiler ($CC, cc or gcc) to build ragserve's PLAID kernels")


def library_path(cache_dir: Path) -> Path:
    """Where the built library for this source, these flags and this machine lives."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(f"{platform.system()}-{platform.machine()}".encode())
    return Path(cache_dir) / "native" / f"plaid_kernels-{h.hexdigest()[:16]}.so"


def build(cache_dir: Path) -> Path:
    """The library, compiled first if this cache does not hold it yet (atomically: a build
    killed half way leaves nothing that looks finished)."""
    out = library_path(cache_dir)
    if out.exists():
        return out
    cc = _compiler()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                             text=True, timeout=_BUILD_TIMEOUT_S)
        if run.returncode != 0:
            raise NativeError(f"{cc} could not build {SOURCE.name}: "
                              f"{(run.stderr or run.stdout).strip()[-500:]}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired as e:
        raise NativeError(f"{cc} took over {_BUILD_TIMEOUT_S} s to build {SOURCE.name}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class PlaidKernels:
    """The three kernels of ``plaid_kernels.c`` on torch tensors (CPU, contiguous; the dtypes
    are checked, a wrong one raises instead of reading garbage). ctypes releases the GIL while
    they run."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.plaid_centroid_interaction.argtypes = [_i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr,
                                                   _ptr, _ptr, _ptr]
        lib.plaid_decompress.argtypes = [_i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64,
                                         _i64, _ptr]
        lib.plaid_segment_maxsim.argtypes = [_i64, _ptr, _ptr, _i64, _ptr]
        for f in (lib.plaid_centroid_interaction, lib.plaid_decompress,
                  lib.plaid_segment_maxsim):
            f.restype = None
        self._lib = lib
        self.path = path

    def centroid_interaction(self, ids: torch.Tensor, score: torch.Tensor, codes: torch.Tensor,
                             offsets: torch.Tensor, doclens: torch.Tensor,
                             keep: torch.Tensor | None) -> torch.Tensor:
        """``[len(ids)]``: per passage, the sum over query vectors of its best centroid score
        (``score: [C, q]``), over the centroids in ``keep`` only when given."""
        import torch

        C, nq = score.shape
        if nq > MAX_QUERY_VECTORS:
            raise ValueError(f"{nq} query vectors: the kernel takes at most {MAX_QUERY_VECTORS}")
        _check(ids, torch.int32, codes=codes)
        _check(score, torch.float32)
        _check(offsets, torch.int64, doclens=doclens)
        if keep is not None:
            _check(keep, torch.bool)
        out = torch.empty(len(ids), dtype=torch.float32)
        stamp = torch.zeros(C, dtype=torch.int32)
        self._lib.plaid_centroid_interaction(
            len(ids), ids.data_ptr(), score.data_ptr(), nq, codes.data_ptr(), offsets.data_ptr(),
            doclens.data_ptr(), None if keep is None else keep.data_ptr(), stamp.data_ptr(),
            out.data_ptr())
        return out

    def decompress(self, ids: torch.Tensor, offsets: torch.Tensor, doclens: torch.Tensor,
                   residuals: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor,
                   table: torch.Tensor) -> torch.Tensor:
        """``[sum of the passages' lengths, dim]`` L2-normalized vectors, passage by passage:
        ``centroids[code]`` plus the residual, byte ``b`` expanding to ``table[b]``."""
        import torch

        _check(ids, torch.int32, codes=codes)
        _check(offsets, torch.int64, doclens=doclens)
        _check(residuals, torch.uint8)
        _check(centroids, torch.float32, table=table)
        dim, per_byte = centroids.shape[1], table.shape[1]
        if table.shape[0] != 256 or residuals.shape[1] * per_byte != dim:
            raise ValueError(f"table {tuple(table.shape)} and residuals "
                             f"{tuple(residuals.shape)} do not make {dim} dimensions")
        total = int(doclens[ids.long()].sum())
        out = torch.empty(total, dim, dtype=torch.float32)
        self._lib.plaid_decompress(len(ids), ids.data_ptr(), offsets.data_ptr(),
                                   doclens.data_ptr(), residuals.data_ptr(), codes.data_ptr(),
                                   centroids.data_ptr(), table.data_ptr(), dim, per_byte,
                                   out.data_ptr())
        return out

    def segment_maxsim(self, lens: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        """``[len(lens)]`` MaxSim from token-by-query scores ``sims: [sum(lens), q]``, passage i
        being the next ``lens[i]`` rows (0 for a passage with none)."""
        import torch

        _check(lens, torch.int64)
        _check(sims, torch.float32)
        if sims.shape[1] > MAX_QUERY_VECTORS:
            raise ValueError(f"{sims.shape[1]} query vectors: the kernel takes at most "
                             f"{MAX_QUERY_VECTORS}")
        if int(lens.sum()) != sims.shape[0]:
            raise ValueError(f"lengths sum to {int(lens.sum())}, sims has {sims.shape[0]} rows")
        out = torch.empty(len(lens), dtype=torch.float32)
        self._lib.plaid_segment_maxsim(len(lens), lens.data_ptr(), sims.data_ptr(),
                                       sims.shape[1], out.data_ptr())
        return out


def _check(t: torch.Tensor, dtype: torch.dtype, **same: torch.Tensor) -> None:
    for name, x in {"tensor": t, **same}.items():
        if x.dtype != dtype or x.device.type != "cpu" or not x.is_contiguous():
            raise TypeError(f"{name}: expected a contiguous CPU {dtype}, got {x.dtype} on "
                            f"{x.device} (contiguous: {x.is_contiguous()})")


def load(cache_dir: Path) -> PlaidKernels:
    """The kernels, built into ``cache_dir`` on first use; :class:`NativeError` says why not.
    (Loading a library already loaded is a dlopen of the same handle: cheap.)"""
    prebuilt = library_path(PREBUILT)
    path = prebuilt if prebuilt.exists() else build(cache_dir)
    try:
        return PlaidKernels(path)
    except OSError as e:
        raise NativeError(f"{path} does not load: {e}") from e


def main(argv: list[str] | None = None) -> int:
    """``python -m retrieval.native [--into DIR]``: build the library into DIR (default: this
    package's ``_prebuilt``, for images without a compiler at run time) and print its path."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m retrieval.native", description=main.__doc__)
    p.add_argument("--into", type=Path, default=PREBUILT)
    args = p.parse_args(argv)
    try:
        print(build(args.into))
    except NativeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

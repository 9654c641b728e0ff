"""Write a trace to one safetensors file (format v1, see `traces/FORMAT.md`).

`write_trace` writes a trace held in memory. `TraceWriter` writes one in parts with bounded
memory (the recorder's long runs): each part is validated and spooled per tensor to disk, and
`close()` lays the spools out as one file and reads it back through the trace reader. Both lay
out the safetensors file the same way (8-byte header size, JSON header with the checksums of
every tensor, tensors back to back by falling itemsize then name, so each is aligned). Arrays
are validated with the reader's checks, on the values as stored, so a file we write always loads.

Files appear whole or not at all: bytes go to a visible temporary `<name>.partial-<pid>` beside
the destination, fsynced and renamed over it; any exception, Ctrl-C or SIGTERM removes the
temporary and the spools. The file's mode is 0666 less the umask, as for any file a tool creates.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import threading
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .arrays import TraceArrays
from .format import CHECKSUM_ALGORITHM, FLOAT_DTYPES, FORMAT_NAME, FORMAT_VERSION, TraceMeta, checksums_json
from .validate import check_arrays

_TORCH_FLOAT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}


def _check_float_dtype(float_dtype: str) -> None:
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype: expected one of {sorted(FLOAT_DTYPES)}, found {float_dtype!r}")


def stored_tensors(arrays: TraceArrays, float_dtype: str = "float16") -> dict[str, torch.Tensor]:
    """The tensors of `arrays` in their on-disk dtypes (ids int16 when E fits, floats as asked)."""
    _check_float_dtype(float_dtype)
    id_dtype = torch.int16 if arrays.meta.num_experts <= np.iinfo(np.int16).max else torch.int32
    tensors = {
        "request_id": torch.from_numpy(np.ascontiguousarray(arrays.request_id, dtype=np.int32)),
        "position": torch.from_numpy(np.ascontiguousarray(arrays.position, dtype=np.int32)),
        "phase": torch.from_numpy(np.ascontiguousarray(arrays.phase, dtype=np.int8)),
        "ids": torch.from_numpy(np.ascontiguousarray(arrays.ids, dtype=np.int64)).to(id_dtype),
    }
    for name in ("weights", "logits"):
        value = getattr(arrays, name)
        if value is not None:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).to(_TORCH_FLOAT[float_dtype])
    if arrays.arrival_s is not None:
        tensors["arrival_s"] = torch.from_numpy(np.ascontiguousarray(arrays.arrival_s, dtype=np.float64))
    return tensors


def _raw(t: torch.Tensor) -> np.ndarray:
    """A tensor's stored bytes, flat, without a copy when it is contiguous."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def header_metadata(meta: TraceMeta, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The `__metadata__` of a trace holding `tensors` (digests of their bytes as stored)."""
    meta_text = meta.to_json()
    sums = {n: (_SAFETENSORS_DTYPE[t.dtype], tuple(t.shape), hashlib.new(CHECKSUM_ALGORITHM, _raw(t)).hexdigest())
            for n, t in tensors.items()}
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": meta_text,
            "checksums": checksums_json(meta_text, sums)}


def file_header(meta: TraceMeta, layout: list[tuple[str, str, tuple[int, ...], int, str]]) -> bytes:
    """8-byte size and JSON header for tensors laid out back to back in `layout` order:
    [(name, safetensors dtype, shape, nbytes, hex digest)]."""
    header, offset = {}, 0
    for name, dtype, shape, nbytes, _ in layout:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    meta_text = meta.to_json()
    header["__metadata__"] = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": meta_text,
                              "checksums": checksums_json(meta_text, {n: (d, s, h) for n, d, s, _, h in layout})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def _order(items: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """Tensor order in the file: falling itemsize, then name (every tensor starts aligned)."""
    return sorted(items, key=lambda n: (-items[n][0].itemsize, n))


def partial_path(path: Path, kind: str = "partial") -> Path:
    """The visible temporary beside `path`: `<name>.partial-<pid>` (name shortened to fit 255 bytes)."""
    return path.with_name(f"{path.name[:200]}.{kind}-{os.getpid()}")


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside: SIGTERM raises SystemExit(143) instead of killing the process at once, so that
    `finally` blocks remove temporary files. Only in the main thread, and only where SIGTERM
    has its default action (a program's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _named(e: OSError, path: Path) -> OSError:
    return type(e)(e.errno, e.strerror or str(e), str(path))


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[tuple[object, Path]]:
    """(binary file, its temporary path): written in full, fsynced and renamed to `path` when
    the block ends; removed on any exception (Ctrl-C and SIGTERM included). OS errors name `path`."""
    if len(os.fsencode(path.name)) > 255:  # NAME_MAX of every Linux file system
        raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    tmp = partial_path(path)
    with terminate_as_exit():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # our own pid's: a dead process's leftover
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise _named(e, path) from None
        try:
            with os.fdopen(fd, "wb") as f:
                yield f, tmp
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _named(e, path) if e.filename in (None, str(tmp)) else e from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_trace(path: str | Path, arrays: TraceArrays, float_dtype: str = "float16") -> Path:
    """Validate `arrays` and write them to `path`; floats are stored as `float_dtype`."""
    path = Path(path)
    _check_float_dtype(float_dtype)
    check_arrays(arrays, file=str(path), float_dtype=float_dtype)
    tensors = stored_tensors(arrays, float_dtype)
    names = _order({n: (t.dtype, ()) for n, t in tensors.items()})
    raw = {n: _raw(tensors[n]) for n in names}
    layout = [(n, _SAFETENSORS_DTYPE[tensors[n].dtype], tuple(tensors[n].shape), raw[n].nbytes,
               hashlib.new(CHECKSUM_ALGORITHM, raw[n]).hexdigest()) for n in names]
    with atomic_output(path) as (f, _):
        f.write(file_header(arrays.meta, layout))
        for n in names:
            f.write(memoryview(raw[n]))
    return path


class TraceWriter:
    """Write a trace part by part; memory holds one part at a time. Parts are whole requests
    (a request may not continue into the next part) of one meta, with the same optional fields.
    Spools live in `<name>.parts-<pid>/` beside the destination until `close()` (or an error,
    or garbage collection) removes them.

        with TraceWriter(path, meta) as w:
            for part in parts:
                w.append(part)
    """

    def __init__(self, path: str | Path, meta: TraceMeta, float_dtype: str = "float16"):
        self.path, self.meta, self.float_dtype = Path(path), meta, float_dtype
        _check_float_dtype(float_dtype)
        meta.check(str(self.path))
        self._spool = partial_path(self.path, "parts")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self._spool, ignore_errors=True)  # our own pid's: a dead process's leftover
            self._spool.mkdir()
        except OSError as e:
            raise _named(e, self.path) from None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._spool), ignore_errors=True)
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._hashers: dict[str, "hashlib._Hash"] = {}
        self.rows = 0
        self._requests: set[int] = set()

    def append(self, arrays: TraceArrays) -> None:
        if not self._cleanup.alive:
            raise ValueError(f"{self.path}: the writer is closed")
        if arrays.meta != self.meta:
            raise ValueError(f"{self.path}: every part must carry the writer's meta (found {arrays.meta.model!r} "
                             f"with different settings)")
        check_arrays(arrays, file=f"{self.path} (part from row {self.rows})", float_dtype=self.float_dtype)
        reqs = set(np.unique(arrays.request_id).tolist())
        again = sorted(reqs & self._requests)
        if again:
            raise ValueError(f"{self.path}: request ids {again[:5]} continue from an earlier part; a part holds whole requests")
        tensors = stored_tensors(arrays, self.float_dtype)
        layout = {n: (t.dtype, tuple(t.shape[1:])) for n, t in tensors.items()}
        if self._layout and layout != self._layout:
            raise ValueError(f"{self.path}: part from row {self.rows} has fields {sorted(layout)}, earlier parts "
                             f"{sorted(self._layout)} (the same fields and shapes are needed in every part)")
        self._layout = layout
        try:
            for name, t in tensors.items():
                data = _raw(t)
                with open(self._spool / name, "ab") as f:
                    f.write(memoryview(data))
                self._hashers.setdefault(name, hashlib.new(CHECKSUM_ALGORITHM)).update(data)
        except OSError as e:
            self._cleanup()
            raise _named(e, self.path) from None
        self.rows += int(arrays.ids.shape[0])
        self._requests |= reqs

    def close(self) -> Path:
        """Lay the spooled parts out as one file, check it with the reader, remove the spools."""
        try:
            if not self._layout:
                raise ValueError(f"{self.path}: no parts were appended")
            names = _order(self._layout)
            layout = []
            for name in names:
                dtype, tail = self._layout[name]
                layout.append((name, _SAFETENSORS_DTYPE[dtype], (self.rows, *tail), (self._spool / name).stat().st_size,
                               self._hashers[name].hexdigest()))
            from .reader import Trace  # the whole file through the reader's header, checksum and data checks

            with atomic_output(self.path) as (out, tmp):
                out.write(file_header(self.meta, layout))
                for name in names:
                    with open(self._spool / name, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
                out.flush()
                Trace(tmp).close()
            return self.path
        finally:
            self._cleanup()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._cleanup()


def rehash(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a trace with checksums (a file written before they existed): every data check runs
    on `src` first, the bytes are copied as they are, and the copy is verified against the digests
    of the source. `dst` may be `src` (replaced once the new file is complete)."""
    from .reader import SAFETENSORS_ITEMSIZE, STORED_DTYPES, Trace

    with Trace(src, require_checksums=False) as tr:
        sums = tr.checksums  # {name: (dtype, shape, digest)}, computed by the verifying pass
        order = _order({n: (STORED_DTYPES[d], ()) for n, (d, _, _) in sums.items()})
        layout = [(n, sums[n][0], sums[n][1], SAFETENSORS_ITEMSIZE[sums[n][0]] * math.prod(sums[n][1]), sums[n][2])
                  for n in order]
        with atomic_output(Path(dst)) as (out, tmp):
            out.write(file_header(tr.meta, layout))
            for name, _, shape, nbytes, _ in layout:
                step = max(1, (16 << 20) * shape[0] // max(nbytes, 1))  # rows per 16 MiB
                for a in range(0, shape[0], step):
                    out.write(memoryview(_raw(tr.read_stored(name, a, a + step))))
            out.flush()
            Trace(tmp).close()
    return Path(dst)

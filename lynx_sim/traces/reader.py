"""Open a native trace: header and metadata checked at once, data streamed by positioned reads.

The safetensors header is parsed here (8-byte little-endian size, JSON header, tensors back to
back) and checked against the file's size; the file is never memory-mapped (a private mapping
of a trace larger than RAM fails under strict overcommit, and would leave its pages in the
process). Per-token bookkeeping columns (request id, position, phase, arrival: 9-17 bytes a
token) are loaded; the routing tensors (ids, weights, logits) are read by row range on demand
into fresh buffers, so replaying or validating a trace larger than RAM keeps memory flat.

Opening verifies (unless `verify=False`): the header's sha256 of every tensor and of the
metadata, and the data checks of `validate.py`, in one streamed pass over the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import weakref
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .errors import TraceFormatError
from .format import (CHECKSUM_ALGORITHM, FIELDS, FLOAT_EPS, FORMAT_NAME, FORMAT_VERSION, HEADER_KEYS, TraceMeta,
                     content_hash, digest_hex, distinct_keys, is_int, json_found, parse_checksums)
from .validate import check_routing_block, check_shape, check_token_columns

DEFAULT_CHUNK_TOKENS = 4096  # rows per block of `iter_blocks`
CHUNK_BYTES = 16 << 20  # stored routing bytes per block of the validation pass
MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's limit
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                 "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                 "BOOL": torch.bool}
SAFETENSORS_FILE = "a safetensors trace file (8-byte header size, JSON header, tensor data)"


class Entry(NamedTuple):
    """One tensor of the file: absolute byte offset, safetensors dtype, shape, size in bytes."""

    offset: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def os_error(e: OSError, file: str) -> OSError:
    """The same OS error (same type and errno: ENOMEM, EACCES, EIO...), naming the trace file."""
    return type(e)(e.errno, e.strerror or str(e), file)


def pread_exact(fd: int, buf: np.ndarray, offset: int, file: str, what: str) -> None:
    """Fill the uint8 buffer `buf` from byte `offset` (a positioned read may return less than asked)."""
    done = 0
    while done < buf.size:
        try:
            got = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as e:
            raise os_error(e, file) from None
        if got <= 0:
            raise TraceFormatError(file, what, f"{buf.size} bytes from byte {offset}", f"{done} (file truncated)")
        done += got


def read_layout(fd: int, file: str) -> tuple[dict[str, str], dict[str, Entry]]:
    """(`__metadata__`, {name: Entry}) of a safetensors file, checked as its specification asks:
    a header inside the file, JSON with distinct keys, known dtypes, offsets that match
    shape x itemsize, and tensors that cover the data back to back up to the file's end."""
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        raise os_error(e, file) from None
    if size < 8:
        raise TraceFormatError(file, "file", SAFETENSORS_FILE, f"{size} bytes (truncated)")
    head = np.empty(8, np.uint8)
    pread_exact(fd, head, 0, file, "file")
    (n,) = struct.unpack("<Q", head.tobytes())
    if n > MAX_HEADER_BYTES:
        raise TraceFormatError(file, "file", f"{SAFETENSORS_FILE}, a header of at most {MAX_HEADER_BYTES} bytes",
                               f"a header size of {n} bytes: not a safetensors file")
    if 8 + n > size:
        raise TraceFormatError(file, "file", SAFETENSORS_FILE, f"a header of {n} bytes in a file of {size} bytes (truncated)")
    raw = np.empty(n, np.uint8)
    pread_exact(fd, raw, 8, file, "file")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"), object_pairs_hook=distinct_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TraceFormatError(file, "file", SAFETENSORS_FILE,
                               f"a header that is not UTF-8 JSON with distinct keys ({e}): not a trace, or corrupted") from None
    if not isinstance(header, dict):
        raise TraceFormatError(file, "file", SAFETENSORS_FILE, f"a JSON header {json_found(header)}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TraceFormatError(file, "__metadata__", "an object of strings", json_found(metadata))
    entries, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise TraceFormatError(file, name, "a tensor entry {dtype, shape, data_offsets}", json_found(info))
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise TraceFormatError(file, name, f"a safetensors dtype among {sorted(SAFETENSORS_ITEMSIZE)}", json_found(dtype))
        if not isinstance(shape, list) or len(shape) > 8 or not all(is_int(s) and s >= 0 for s in shape):
            raise TraceFormatError(file, name, "a shape: a list of at most 8 integers >= 0", json_found(shape))
        if (not isinstance(offs, list) or len(offs) != 2 or not all(is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise TraceFormatError(file, name, "data_offsets [begin, end] with 0 <= begin <= end", json_found(offs))
        nbytes = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if offs[1] - offs[0] != nbytes:
            raise TraceFormatError(file, name, f"data_offsets spanning shape {shape} x {SAFETENSORS_ITEMSIZE[dtype]} "
                                   f"bytes = {nbytes} bytes", f"{offs[1] - offs[0]} bytes (data_offsets {offs})")
        entries[name] = Entry(8 + n + offs[0], dtype, tuple(shape), nbytes)
        spans.append((offs[0], offs[1], name))
    end = 0
    for b, e, name in sorted(spans):
        if b != end:
            raise TraceFormatError(file, name, f"data from byte {end} of the data section (tensors back to back, "
                                   "no gap, no overlap)", f"data_offsets [{b}, {e}]")
        end = e
    if 8 + n + end != size:
        found = f"{size} bytes (truncated)" if 8 + n + end > size else f"{size} bytes ({size - 8 - n - end} trailing bytes)"
        raise TraceFormatError(file, "file", f"{SAFETENSORS_FILE} of {8 + n + end} bytes", found)
    return metadata, entries


class Trace:
    """A read-only view of one trace file. Use `read(name, start, stop)` for routing tensors.

    verify: check every tensor's and the metadata's checksum and run the data checks (one
    streamed pass, flat memory); False opens in the time of reading the header and the token
    columns (the data is then trusted as it is). `validate` is the older name of `verify`.
    require_checksums: refuse a file without checksums (`rehash` adds them; see FORMAT.md).
    """

    def __init__(self, path: str | Path, verify: bool = True, chunk_tokens: int | None = None, *,
                 validate: bool | None = None, require_checksums: bool = True):
        self.path = Path(path)
        file = str(self.path)
        verify = verify if validate is None else validate
        try:
            st = os.stat(file)
        except FileNotFoundError:
            raise TraceFormatError(file, "file", "an existing trace file", "no such file") from None
        except OSError as e:
            raise os_error(e, file) from None
        if not stat.S_ISREG(st.st_mode):
            raise TraceFormatError(file, "file", "a regular trace file", "a directory" if stat.S_ISDIR(st.st_mode)
                                   else "not a regular file")
        try:
            self._fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise os_error(e, file) from None
        self._close = weakref.finalize(self, os.close, self._fd)
        try:
            self._open(file, verify, chunk_tokens, require_checksums)
        except BaseException:
            self._close()
            raise

    def _open(self, file: str, verify: bool, chunk_tokens: int | None, require_checksums: bool) -> None:
        header, self._entries = read_layout(self._fd, file)
        unknown = sorted(set(header) - set(HEADER_KEYS))
        if unknown:
            raise TraceFormatError(file, "__metadata__", f"keys among {list(HEADER_KEYS)}", f"unknown keys {unknown}")
        if header.get("format") != FORMAT_NAME:
            raise TraceFormatError(file, "format", f"'{FORMAT_NAME}' in the safetensors header", repr(header.get("format")))
        if header.get("format_version") != str(FORMAT_VERSION):
            raise TraceFormatError(file, "format_version", f"{FORMAT_VERSION} (this reader)",
                                   repr(header.get("format_version")))
        if "meta" not in header:
            raise TraceFormatError(file, "meta", "the trace metadata in the header", "nothing")
        self.meta = TraceMeta.from_json(header["meta"], file)
        self.fields = set(self._entries)
        # checksums before the field table: a header entry that lies (a corrupted dtype or shape)
        # is named by the tensor it lies about, not by a tensor whose shape no longer matches it
        self.checksummed = "checksums" in header
        self.verified = False
        self._digests: dict[str, str] | None = None  # from the header, or computed for a file without
        if self.checksummed:
            meta_digest, self._digests = parse_checksums(header["checksums"], file,
                                                         {n: (e.dtype, e.shape) for n, e in self._entries.items()})
            if digest_hex(header["meta"].encode()) != meta_digest:
                raise TraceFormatError(file, "meta", f"metadata whose {CHECKSUM_ALGORITHM} is the header's checksum "
                                       f"{meta_digest[:16]}...", "different metadata: the header is corrupted or was edited")
        elif require_checksums:
            raise TraceFormatError(file, "checksums", "per-tensor checksums in the header (a file written before "
                                   "checksums: `python -m lynx_sim.traces rehash FILE NEW`)", "nothing")
        self._check_tensors(file)
        self._layout = {n: (e.offset, STORED_DTYPES[e.dtype], e.shape) for n, e in self._entries.items()}
        cols = {}
        for name in ("request_id", "position", "phase", "arrival_s"):
            if name in self.fields:
                t = self.read_stored(name)
                if verify and self._digests is not None:
                    self._check_digest(name, _digest(t))
                cols[name] = self.as_numpy(name, t)
        self.request_id, self.position, self.phase = cols["request_id"], cols["position"], cols["phase"]
        self.arrival_s = cols.get("arrival_s")
        check_token_columns(file, self.request_id, self.position, self.phase, self.arrival_s)
        starts = np.flatnonzero(np.r_[True, self.request_id[1:] != self.request_id[:-1]])
        self.request_offsets = np.r_[starts, self.num_tokens].astype(np.int64)  # [R + 1]
        if verify:
            self.validate_data(chunk_tokens)

    def _check_tensors(self, file: str) -> None:
        """Tensor names, dtypes and shapes against the format's field table and the metadata."""
        unknown = sorted(self.fields - set(FIELDS))
        if unknown:
            raise TraceFormatError(file, "tensors", f"names among {sorted(FIELDS)}", f"unknown {unknown}")
        ids = self._entries.get("ids")
        if ids is None or len(ids.shape) != 3:
            raise TraceFormatError(file, "ids", "a tensor [N, L, k]", "nothing" if ids is None else f"shape {list(ids.shape)}")
        self.num_tokens = int(ids.shape[0])
        sizes = {"N": self.num_tokens, "L": self.meta.num_layers, "k": self.meta.top_k, "E": self.meta.num_experts}
        for name, (dtypes, symbols, required) in FIELDS.items():
            e = self._entries.get(name)
            if e is None:
                if required:
                    raise TraceFormatError(file, name, "a tensor in the file", "nothing")
                continue
            if e.dtype not in dtypes:
                raise TraceFormatError(file, name, f"dtype {' or '.join(dtypes)}", e.dtype)
            check_shape(file, name, e.shape, tuple(sizes[s] for s in symbols), symbols)
        given = sorted(set(self.meta.missing) & self.fields)
        if given:
            raise TraceFormatError(file, "missing", f"only what the trace lacks (it has {given})",
                                   json_found(list(self.meta.missing)))

    def _check_digest(self, name: str, got: str) -> None:
        want = self._digests[name]
        if got != want:
            raise TraceFormatError(str(self.path), name, f"stored bytes whose {CHECKSUM_ALGORITHM} is the header's "
                                   f"checksum {want[:16]}...", f"{got[:16]}...: the tensor's data is corrupted")

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    @property
    def num_requests(self) -> int:
        return len(self.request_offsets) - 1

    @property
    def checksums(self) -> dict[str, tuple[str, tuple[int, ...], str]]:
        """{tensor: (safetensors dtype, shape, sha256 hex digest of its stored bytes)}: the header's
        (verified when the trace was opened with verify=True), or, for a file without checksums,
        computed by one streamed pass."""
        if self._digests is None:
            self._digests = self._hash_all()
        return {n: (e.dtype, e.shape, self._digests[n]) for n, e in self._entries.items()}

    @property
    def content_hash(self) -> str:
        """One sha256 hex digest of the trace's content: canonical metadata, every tensor's dtype,
        shape and digest (`format.content_hash`); equal for traces with equal content."""
        return content_hash(self.meta, self.checksums)

    def has(self, name: str) -> bool:
        return name in self.fields

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of one tensor as numpy: floats as float32 (float64 for arrival_s), ids as int64."""
        return self.as_numpy(name, self.read_stored(name, start, stop))

    def read_stored(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of one tensor in its stored dtype, read from the file into a fresh
        buffer (positioned reads at the header's offsets: no file pages stay in the process, so
        streaming a long trace keeps the resident size flat)."""
        if name not in self.fields:
            raise KeyError(f"{self.path}: trace has no '{name}' tensor (fields: {sorted(self.fields)})")
        offset, dtype, shape = self._layout[name]
        start, stop, _ = slice(start, stop).indices(shape[0])
        n = max(stop - start, 0)
        if n == 0:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        row = math.prod(shape[1:]) * dtype.itemsize
        buf = np.empty(n * row, np.uint8)
        pread_exact(self._fd, buf, offset + start * row, str(self.path), name)
        return torch.from_numpy(buf).view(dtype).reshape(n, *shape[1:])

    @staticmethod
    def as_numpy(name: str, t: torch.Tensor, copy: bool = False) -> np.ndarray:
        """Stored rows in the dtypes `read` returns; `copy`: never a view of `t`."""
        dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else torch.int64 if name == "ids" else t.dtype
        return t.to(dtype, copy=copy).numpy()

    def iter_blocks(self, names: tuple[str, ...], chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[tuple[int, dict]]:
        """Yield (first_row, {name: rows}) over the whole trace, `chunk_tokens` rows at a time."""
        for a in range(0, self.num_tokens, chunk_tokens):
            b = min(a + chunk_tokens, self.num_tokens)
            yield a, {n: self.read(n, a, b) for n in names if self.has(n)}

    def _chunk_rows(self, names, chunk_tokens: int | None) -> int:
        if chunk_tokens is not None:
            return max(1, int(chunk_tokens))
        row = sum(self._entries[n].nbytes // max(self.num_tokens, 1) for n in names)
        return max(1, CHUNK_BYTES // max(row, 1))

    def validate_data(self, chunk_tokens: int | None = None) -> None:
        """Stream the routing tensors through their checksums and the format's data checks, a block
        of rows at a time. A data check that fails on a tensor whose checksum fails too is reported
        as the corruption it is."""
        file = str(self.path)
        names = tuple(n for n in ("ids", "weights", "logits") if self.has(n))
        eps = max([FLOAT_EPS[self._entries[n].dtype] for n in names if n != "ids"] or [FLOAT_EPS["F16"]])
        hashers = {n: hashlib.new(CHECKSUM_ALGORITHM) for n in names}
        rows, err = self._chunk_rows(names, chunk_tokens), None
        for a in range(0, self.num_tokens, rows):
            b = min(a + rows, self.num_tokens)
            block = self.read_block(names, a, b)
            for n, t in block.items():
                hashers[n].update(_bytes(t))
            if err is None:
                try:
                    arr = {n: self.as_numpy(n, t) for n, t in block.items()}
                    check_routing_block(file, self.meta, a, arr["ids"], arr.get("weights"), arr.get("logits"), eps)
                except TraceFormatError as e:
                    if self._digests is None:
                        raise
                    err = e  # keep hashing: a corrupted byte is the better explanation
        got = {n: h.hexdigest() for n, h in hashers.items()}
        if self._digests is None:
            self._digests = {**self._hash_all(skip=names), **got}
        else:
            for n in names:
                self._check_digest(n, got[n])
        if err is not None:
            raise err
        self.verified = True

    def _hash_all(self, skip: tuple[str, ...] = ()) -> dict[str, str]:
        """Digests of every tensor (but `skip`), streamed in blocks of CHUNK_BYTES."""
        out = {}
        for name, e in self._entries.items():
            if name in skip:
                continue
            h = hashlib.new(CHECKSUM_ALGORITHM)
            rows = self._chunk_rows((name,), None)
            for a in range(0, e.shape[0], rows):
                h.update(_bytes(self.read_stored(name, a, a + rows)))
            out[name] = h.hexdigest()
        return out

    def read_block(self, names, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows [start, stop) of the named tensors the trace has, in their stored dtypes."""
        return {n: self.read_stored(n, start, stop) for n in names if self.has(n)}

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The stored bytes of a tensor read by `read_stored`, flat, for hashing."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _digest(t: torch.Tensor) -> str:
    return digest_hex(_bytes(t))


def data_layout(path: Path) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    """name -> (absolute byte offset, dtype, shape) of each tensor of a safetensors file."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        _, entries = read_layout(fd, str(path))
    finally:
        os.close(fd)
    unknown = {n: e.dtype for n, e in entries.items() if e.dtype not in STORED_DTYPES}
    if unknown:
        name, dtype = next(iter(unknown.items()))
        raise TraceFormatError(str(path), name, f"a dtype among {sorted(STORED_DTYPES)}", dtype)
    return {n: (e.offset, STORED_DTYPES[e.dtype], e.shape) for n, e in entries.items()}


def open_trace(path: str | Path, verify: bool = True, *, validate: bool | None = None) -> Trace:
    """Open and (by default) fully verify a native trace file."""
    return Trace(path, verify=verify if validate is None else validate)

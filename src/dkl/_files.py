"""Files dkl writes and reads: atomic writes, content hashes, what a file really is, safe loads.

- :func:`atomic_write`: a temporary file in the same folder, fsync, ``os.replace``: a crash or a
  full disk leaves the old file or the new one, never a torn one, and a failed write is one
  ``OSError`` line naming the file.
- :func:`content_sha256`: the SHA-256 of a checkpoint's content (every key, number, string and
  the bytes of every tensor, in order), the same before ``torch.save`` and after ``torch.load``.
  A checkpoint stores it under :data:`HASH_KEY`; :func:`load_torch_file` recomputes and compares
  it, so a file damaged on disk (a flipped byte in a tensor or in the pickled numbers) is
  refused instead of silently loaded.
- :func:`sniff`: what a file holds, from its first bytes (a PNG, a JPEG, a zip written by NumPy or
  by torch, a pickle, YAML / text, nothing): the words of "expected X, got Y" messages.
- :func:`load_torch_file`: ``torch.load(weights_only=True)`` with one-line
  :class:`CheckpointError` messages naming the file and the problem.

torch is imported where it is used, so that writing a config (``dkl.config``) does not need it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "HASHED_MARK",
    "HASH_KEY",
    "CheckpointError",
    "atomic_write",
    "content_sha256",
    "file_sha256",
    "load_torch_file",
    "sniff",
    "verify_content",
]

#: the key under which a checkpoint dict stores the SHA-256 of the rest of its content
HASH_KEY = "sha256"
#: a second key every hashed checkpoint carries (it is part of the hashed content): a damaged
#: byte that renames one of the two keys cannot make the file pass for one written without a hash
HASHED_MARK = "hashed"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, damaged, of another kind or
    model. The message is one line naming the file."""


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _tmp_name(path: Path, pid: int | str) -> Path:
    return path.with_name(f".{path.name}.tmp{pid}")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], what: str = "file") -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then ``os.replace``.

    A failure at any moment (a full disk, a quota, a kill) leaves ``path`` as it was. A failed
    write removes its temporary file and raises ``OSError`` (same errno) whose message names the
    file, the reason and that the previous file is intact.
    """
    path = Path(path)
    tmp = _tmp_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        failed = _write_error(e)
        if failed is not None:
            code, reason = failed
            full = code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
            hint = " (free some space and resume)" if full else ""
            kept = f"; the previous '{path.name}' is intact" if path.exists() else ""
            msg = f"could not write {what} '{path}': {reason}{kept}{hint}"
            raise (OSError(code, msg) if code else OSError(msg)) from e
        raise


def _write_error(e: BaseException) -> tuple[int | None, str] | None:
    """``(errno, reason)`` of the file system's error behind a failed write: ``e`` or the first
    ``OSError`` it was raised from; ``None`` for any other error. torch.save's zip writer turns a
    full disk or a file-size limit (``OSError`` ENOSPC, EFBIG) into ``RuntimeError: [enforce fail
    at inline_container.cc] unexpected pos ...``, with the ``OSError`` only as its context."""
    seen: set[int] = set()
    node: BaseException | None = e
    while node is not None and id(node) not in seen:
        if isinstance(node, OSError):
            code = node.errno or None
            return code, os.strerror(code) if code else (str(node) or type(node).__name__)
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    if isinstance(e, RuntimeError) and "unexpected pos" in str(e):  # torch's, with no OSError
        return None, f"the write stopped short ({str(e).strip().splitlines()[0]})"
    return None


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _feed(h: Any, x: Any) -> None:
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(x, dict):
        h.update(f"D{len(x)}:".encode())
        for k, v in x.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(x, (list, tuple)):
        h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}:".encode())
        for v in x:
            _feed(h, v)
    elif isinstance(x, str):
        b = x.encode("utf-8", "surrogatepass")
        h.update(f"S{len(b)}:".encode() + b)
    elif isinstance(x, bytes):
        h.update(f"B{len(x)}:".encode() + x)
    else:  # numbers, None, torch.dtype / device / Size: repr is exact for floats
        h.update(f"{type(x).__name__}:{x!r};".encode())


def content_sha256(obj: Any) -> str:
    """The SHA-256 (hex) of ``obj``'s content, ignoring a top-level :data:`HASH_KEY`.

    The same for an object and for what ``torch.load`` gives back of it: it reads values (keys
    in order, numbers by ``repr``, tensors by dtype, shape and bytes), not the file's layout.

    >>> import torch
    >>> a = {"w": torch.ones(2), "epoch": 3}
    >>> content_sha256(a) == content_sha256({"w": torch.ones(2), "epoch": 3, HASH_KEY: "x"})
    True
    >>> content_sha256(a) == content_sha256({"w": torch.tensor([1.0, 1.0 + 2**-23]), "epoch": 3})
    False
    """
    h = hashlib.sha256()
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != HASH_KEY}
    _feed(h, obj)
    return h.hexdigest()


def verify_content(obj: Any, path: str | Path) -> None:
    """Raise :class:`CheckpointError` when ``obj`` carries a :data:`HASH_KEY` that its content
    does not match (a file damaged after it was written). Files without one pass."""
    if not isinstance(obj, dict) or (HASH_KEY not in obj and HASHED_MARK not in obj):
        return
    stored = obj.get(HASH_KEY)
    if not isinstance(stored, str) or content_sha256(obj) != stored:
        raise CheckpointError(
            f"'{path}' is damaged: its content does not match the SHA-256 recorded when it was "
            f"written (a disk or copy error, or an edit); restore it from a copy or retrain it"
        )


# --------------------------------------------------------------------------------------------
# What a file is
# --------------------------------------------------------------------------------------------

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"RIFF", "a RIFF file (WebP, WAV, ...)"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
)


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "a damaged or truncated zip archive"
    if not names:
        return "an empty zip archive"
    if any(n.endswith("data.pkl") for n in names):
        return "a zip archive written by torch.save (a torch checkpoint)"
    if all(n.endswith(".npy") for n in names):
        return "a zip archive written by numpy.savez (a NumPy .npz)"
    return "a zip archive"


def sniff(path: str | Path) -> str:
    """What ``path`` holds, judged from its first bytes (``"an empty file"``, ``"a PNG image"``,
    ``"a zip archive written by numpy.savez (a NumPy .npz)"``, ``"a pickle"``, ``"text"``,
    ``"unrecognised binary data"``...). Never raises for a readable file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"unreadable ({os.strerror(e.errno) if e.errno else e})"
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_kind(path)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a pickle (a file written by torch.save before torch 1.6, or pickle.dump)"
    if len(head) >= 10:  # safetensors: an 8-byte little-endian header length, then JSON
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "a safetensors file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return "text (JSON?)"
    return "text"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_torch_file(
    path: str | Path, map_location: Any = "cpu", what: str = "checkpoint", verify: bool = True
) -> Any:
    """``torch.load(path, weights_only=True)``; a file from elsewhere cannot run code.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError`, one line naming
    the file, for one that is empty, truncated, of another format (what it is instead), damaged
    (its recorded content hash differs) or holding objects other than tensors and plain
    containers (refused unread). With ``verify``, a stored :data:`HASH_KEY` is checked.
    """
    import torch

    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise CheckpointError(f"{what} '{path}' is {kind}, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} '{path}' is empty (0 bytes): an interrupted copy?")
    kind = sniff(path)
    torch_like = kind.startswith(("a zip archive written by torch", "a pickle"))
    if not torch_like:
        if kind == "a zip archive" or kind.startswith("a damaged"):
            raise CheckpointError(
                f"cannot load {what} '{path}': truncated or damaged ({kind}, {size} bytes)"
            )
        raise CheckpointError(
            f"cannot load {what} '{path}': it is {kind}, not a torch checkpoint (a file written "
            f"by torch.save)"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        if e.errno:  # the file system's error (permissions, I/O): as it is
            raise
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot load {what} '{path}': truncated or damaged ({reason})"
        ) from None
    except pickle.UnpicklingError as e:
        text = str(e)
        if "unsupported global" in text.lower() or "unsupported class" in text.lower():
            name = _refused_global(text)
            raise CheckpointError(
                f"cannot load {what} '{path}': it holds pickled objects other than tensors and "
                f"plain containers{name} (refused unread: loading it could run code). Re-save "
                f"only its state_dict; if you wrote the file yourself and trust it, "
                f"torch.load(weights_only=False) reads it"
            ) from None
        raise CheckpointError(
            f"cannot load {what} '{path}': truncated or damaged (its pickled part is unreadable)"
        ) from None
    except Exception as e:  # noqa: BLE001  (damaged bytes fail anywhere inside the reader)
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0][:120]}" if text else type(e).__name__
        raise CheckpointError(
            f"cannot load {what} '{path}': truncated or damaged ({reason})"
        ) from None
    if verify:
        verify_content(obj, path)
    return obj


def _refused_global(text: str) -> str:
    """`` (os.system)`` from torch's "Unsupported global: GLOBAL os.system was not ..." message."""
    marker = "GLOBAL "
    i = text.find(marker)
    if i < 0:
        return ""
    name = text[i + len(marker) :].split()[0] if text[i + len(marker) :].split() else ""
    return f" ({name})" if name else ""

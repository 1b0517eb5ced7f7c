"""Atomic saves: an edit pack on disk is always a complete pack, the old one or the new one.

``PeftModel.save_pretrained`` writes ``adapter_model.safetensors``, ``adapter_config.json`` and
``README.md`` one after another, in place. A process killed in between (Ctrl-C, OOM killer, a
preempted job) leaves a truncated weights file, or new weights next to an old config: the previous
pack is gone and the new one does not load. For an edit pack that is worse than for a plain adapter,
because a config from one save and weights from another can *load* (same shapes) and route inputs to
the wrong deltas.

So every save ldke-peft makes goes through :func:`atomic_dir`:

1. the files are written into a fresh staging folder *next to* the target (same filesystem), named
   ``.<name>.ldke-tmp-XXXXXXXX``;
2. files the target folder already holds and the save did not rewrite (a processor saved there,
   another adapter's subfolder, ``ldke_report.json``) are hard-linked into the staging folder, so the
   result is exactly what an in-place save would have produced;
3. every file is ``fsync``-ed, then the staging folder and the target are swapped with one
   ``renameat2(RENAME_EXCHANGE)`` system call (Linux >= 3.15) — atomic: at every instant the target
   path is either the complete old folder or the complete new one — and the old copy is deleted.
   Where the exchange is unavailable (other OSes, filesystems without it) the target is renamed aside
   and the staging folder renamed into place: two renames back to back, so a crash in the
   microseconds between them leaves the target missing but the previous pack complete in
   ``.<name>.ldke-old-XXXXXXXX`` next to it (never a torn pack).

A failed or killed save leaves only a staging folder (a hidden sibling of the target, never inside it).

:func:`atomic_save` is ``PeftModel.save_pretrained`` through this path, for any adapter type. Importing
ldke-peft patches nothing: a plain ``save_pretrained`` stays PEFT's in-place save.

Layer: tuner (README "Architecture"): imports only data and tuner modules, never the editing or product code.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
import tempfile
from typing import Any, Iterator, Sequence

import torch


logger = logging.getLogger(__name__)

__all__ = ["atomic_dir", "atomic_save", "default_dir_mode", "stored_state_dict"]

_TMP_TAG = ".ldke-tmp-"
_OLD_TAG = ".ldke-old-"
#: Files ``PeftModel.save_pretrained`` updates rather than rewrites (it merges its model card into an
#: existing ``README.md``): copied into the staging folder before the save, so the update sees them.
_UPDATED_IN_PLACE = ("README.md",)


# ---------------------------------------------------------------------- the primitive


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = True,
               copy_first: Sequence[str] = ()) -> Iterator[str]:
    """Yield a staging folder; on a clean exit it replaces ``path`` atomically, on an error it is removed.

    Args:
        path: the folder to create or replace (its parent is created if needed).
        keep_existing: keep files and subfolders of an existing ``path`` that the caller did not write
            (hard links, no copy), as an in-place save would. ``False`` = the new folder holds only
            what was written.
        copy_first: names of files in an existing ``path`` copied (real copies) into the staging folder
            *before* the caller writes, for writers that update a file instead of replacing it.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
    """
    target = os.path.realpath(os.fspath(path))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"cannot save to {os.fspath(path)!r}: it exists and is not a folder")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{name}{_TMP_TAG}", dir=parent)
    try:
        # mkdtemp makes the folder private (0700); the result gets the mode of the folder it replaces,
        # or the one a plain mkdir would give (0777 minus the umask)
        os.chmod(stage, stat.S_IMODE(os.stat(target).st_mode) if os.path.isdir(target) else default_dir_mode())
        if os.path.isdir(target):
            for fname in copy_first:
                src = os.path.join(target, fname)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(stage, fname))
        yield stage
        if keep_existing and os.path.isdir(target):
            _link_missing(target, stage)
        _fsync_tree(stage)
        _swap_into_place(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def default_dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777`` minus the process's umask."""
    return 0o777 & ~_umask()


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back
    os.umask(mask)
    return mask


def atomic_save(peft_model: Any, path: str | os.PathLike, *args: Any, **kwargs: Any) -> str:
    """``peft_model.save_pretrained(path, *args, **kwargs)``, atomically (see the module docstring).

    Works for any ``PeftModel``. ldke-peft's own savers (:func:`ldke_peft.hub.save_edits`, the CLI, the
    merge) go through :func:`atomic_dir` too. Here LDKE slot factors are written as the adapter's
    ``delta_storage`` says (:func:`stored_state_dict`); a plain ``save_pretrained`` is PEFT's in-place
    save and writes them in float32 (the same values, twice the bytes). Returns ``path``.
    """
    from peft import PeftModel

    kwargs = _with_stored_state_dict(peft_model, kwargs)
    with atomic_dir(path, copy_first=_UPDATED_IN_PLACE) as stage:
        PeftModel.save_pretrained(peft_model, stage, *args, **kwargs)
    return os.fspath(path)


def stored_state_dict(peft_model: Any) -> dict[str, Any] | None:
    """The model's state dict as its LDKE packs store it: the slot factors of each adapter with
    ``delta_storage="float16"`` in float16 (the fit rounded them already, so this loses nothing);
    ``None`` when no adapter stores them otherwise than as they are."""
    from .peft_type import LDKEPeftType

    configs = getattr(peft_model, "peft_config", {}) or {}
    half = [n for n, c in configs.items()
            if getattr(c, "peft_type", None) == LDKEPeftType.LDKE and getattr(c, "delta_storage", "float32") == "float16"]
    if not half:
        return None
    suffixes = tuple(f".{t}.{n}" for n in half for t in ("ldke_A", "ldke_B"))

    def stored(k: str, v: Any) -> Any:
        if not (k.endswith(suffixes) and v.is_floating_point() and v.dtype != torch.float16):
            return v
        h = v.half()
        # only where nothing is lost (factors set by hand, not by the fit, stay as they are)
        return h if torch.equal(h.to(v.dtype), v) else v

    return {k: stored(k, v) for k, v in peft_model.state_dict().items()}


def _with_stored_state_dict(peft_model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    if kwargs.get("state_dict") is not None:
        return kwargs
    sd = stored_state_dict(peft_model)
    return kwargs if sd is None else {**kwargs, "state_dict": sd}


# ---------------------------------------------------------------------- helpers


def _link_missing(src_dir: str, dst_dir: str) -> None:
    """Hard-link (copy where linking fails) every entry of ``src_dir`` that ``dst_dir`` lacks, recursively.

    Runs *after* the new files were written, so nothing ever writes through a link into the old folder.
    """
    for entry in os.scandir(src_dir):
        dst = os.path.join(dst_dir, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if os.path.isdir(dst):
                _link_missing(entry.path, dst)
            elif not os.path.lexists(dst):
                shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        elif not os.path.lexists(dst):
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), dst)
            else:
                _link_or_copy(entry.path, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_tree(root: str) -> None:
    """Flush every file and folder under ``root`` to disk (a power cut must not reorder the swap
    before the data). Best effort where the OS cannot fsync a folder."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            path = os.path.join(dirpath, fname)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_into_place(stage: str, target: str) -> None:
    parent = os.path.dirname(target)
    if not os.path.lexists(target):
        try:
            os.rename(stage, target)
        except OSError as exc:
            # someone created the target meanwhile: fall through to a swap
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
        else:
            _fsync_dir(parent)
            return
    if _exchange(stage, target):
        # ``stage`` now holds the previous folder
        shutil.rmtree(stage, ignore_errors=True)
    else:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{_OLD_TAG}", dir=parent)
        os.rmdir(old)  # a unique name, free again: renaming onto it must not need an empty-dir replace
        os.rename(target, old)
        os.rename(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError, TypeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOSYS:  # kernel without renameat2
        _renameat2 = False
        return False
    if err in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        # this filesystem cannot exchange (another one may): fall back for this call only
        logger.debug("renameat2(RENAME_EXCHANGE) unsupported for %s (%s); using two renames", b, os.strerror(err))
        return False
    raise OSError(err, f"cannot swap {a!r} and {b!r}: {os.strerror(err)}")

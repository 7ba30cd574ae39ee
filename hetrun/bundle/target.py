"""Where `hetrun export` writes: the output directory, checked before any work and replaced atomically.

An export reserves its place before it builds a weight: DIR's parent must be writable, and DIR must be absent, an
empty directory, or (with --force) a bundle. It writes into `.NAME.partial-TOKEN` beside DIR while it holds an
advisory lock (flock) on `.NAME.export-TOKEN.lock`; TOKEN is its pid and a random tag.

Installing the finished bundle:
- DIR absent: one rename.
- DIR a bundle (--force): Linux's renameat2(RENAME_EXCHANGE) swaps the two directories in one step, so DIR holds
  the old bundle or the new one at every instant, whenever the process is killed; the old one is then removed.
  Where the kernel or filesystem cannot exchange (another OS, some network filesystems), the old bundle is first
  renamed to `.NAME.old-TOKEN/bundle`, then the new one into place; a kill between the two leaves DIR absent, and
  the next export of DIR (or `hetrun run DIR`'s error message) puts the old bundle back.
  A symlink swapped by rename would be atomic everywhere, but DIR would then be a symlink, which `cp -r` and
  `scp -r` handle unlike a directory, and which hetrun refuses as an output; so the symlink is not used.

Leftovers of killed exports (`.NAME.partial-TOKEN`, `.NAME.old-TOKEN`) are removed by the next export of DIR, and
only those whose lock no live process holds: a running export is never touched, nor any folder hetrun did not
make (one without its lock file, e.g. from an older hetrun, stays).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from hetrun.bundle.manifest import MANIFEST
from hetrun.errors import BundleError

T = TypeVar("T")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_target(out: Path, force: bool) -> None:
    """Refuse to clobber anything but an existing bundle (with force) or an empty directory."""
    if out.is_symlink():
        raise BundleError(f"output '{out}' is a symlink; give a plain directory path")
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"output '{out}' exists and is not a directory; choose another -o")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise BundleError(f"output '{out}' is a non-empty directory that is not a hetrun bundle; refusing to replace "
                          "it even with --force: choose another -o")
    if not force:
        raise BundleError(f"bundle '{out}' already exists; pass --force to replace it, or choose another -o")


class Staging:
    """The temporary directory an export writes into, with the lock that marks it as in use."""

    def __init__(self, out: Path, tmp: Path, lock: Path, lock_fd: int, token: str):
        self.out, self.tmp, self.lock, self.token = out, tmp, lock, token
        self._fd = lock_fd

    @classmethod
    def reserve(cls, out: "str | os.PathLike", force: bool) -> "Staging":
        """Check `out`, restore or remove what killed exports of it left, and make the staging directory beside it:
        any problem with the output is a one-line BundleError before the export does any work."""
        out = Path(out)
        check_target(out, force)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BundleError(f"cannot write bundle '{out}': cannot create folder '{out.parent}': "
                              f"{e.strerror or e}") from None
        clean_leftovers(out)
        check_target(out, force)  # a restored old bundle needs --force like any other
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        lock, fd = _take_lock(out, token)
        tmp = out.parent / f".{out.name}.partial-{token}"
        try:
            tmp.mkdir(mode=0o700)
        except OSError as e:
            _release(lock, fd)
            raise BundleError(f"cannot write bundle '{out}': {e.strerror or e}") from None
        return cls(out, tmp, lock, fd, token)

    def install(self, force: bool) -> None:
        """Move the finished bundle into place (see the module doc), then drop the lock."""
        out = self.out
        check_target(out, force)
        if not out.exists():
            os.rename(self.tmp, out)
        elif exchange(self.tmp, out):
            shutil.rmtree(self.tmp, ignore_errors=True)  # the old bundle
        else:
            old = out.parent / f".{out.name}.old-{self.token}"
            old.mkdir(mode=0o700)
            os.rename(out, old / "bundle")
            os.rename(self.tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        self.release()

    def abort(self) -> None:
        """Remove the staging directory and drop the lock (an export that failed or was interrupted)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            _release(self.lock, self._fd)
            self._fd = None


def write_folder(out: Path, force: bool, fill: "Callable[[Path], T]", key=None) -> "T":
    """fill(staging folder) for `out`, reserved first (Staging.reserve: a problem with the output is a one-line
    BundleError before fill runs); with `key` (an Ed25519 private key) the manifest fill wrote is signed
    (hetrun.bundle.signing); its files then get plain permissions under the umask (mkdtemp makes 0700, some writers
    0600) and the folder moves into place. An exception or interrupt removes the staging folder."""
    staging = Staging.reserve(out, force)
    try:
        result = fill(staging.tmp)
        if key is not None:
            from hetrun.bundle.signing import sign_folder  # cryptography: only to sign

            sign_folder(staging.tmp, key)
        _set_modes(staging.tmp)
        staging.install(force)
    except BaseException:
        staging.abort()
        raise
    return result


def _set_modes(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for here, dirs, files in os.walk(root):
        os.chmod(here, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(here, name), 0o666 & ~umask)


def _take_lock(out: Path, token: str) -> tuple[Path, int]:
    """Create `.NAME.export-TOKEN.lock` already locked: made under a temporary name, locked, then renamed, so no
    other export ever sees it unlocked."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.export-{token}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise BundleError(f"cannot write bundle '{out}': folder '{out.parent}' is not writable "
                          f"({e.strerror or e})") from None
    lock = out.parent / f".{out.name}.export-{token}.lock"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a filesystem without flock: no other export can take it either, so nothing is ever removed
        pass
    os.rename(tmp, lock)
    return lock, fd


def _release(lock: Path, fd: int) -> None:
    try:
        os.unlink(lock)
    except OSError:
        pass
    os.close(fd)


def clean_leftovers(out: Path) -> list[str]:
    """Remove what killed exports of `out` left beside it, restoring an old bundle a kill left out of place.

    Only folders named `.NAME.partial-TOKEN` / `.NAME.old-TOKEN` whose lock file `.NAME.export-TOKEN.lock` exists
    and is not locked by a live process. Returns the names handled.
    """
    done = []
    prefix = f".{out.name}."
    try:
        names = [n for n in os.listdir(out.parent) if n.startswith(prefix)]
    except OSError:
        return done
    for name in sorted(names):
        rest = name[len(prefix):]
        kind, _, token = rest.partition("-")
        if kind not in ("partial", "old", "export") or not token:
            continue
        if kind == "export":
            if not token.endswith(".lock") or any(n.endswith("-" + token[:-5]) for n in names):
                continue
            token = token[:-5]  # a lock whose folders are gone
        lock = out.parent / f"{prefix}export-{token}.lock"
        fd = _lock_if_free(lock)
        if fd is None:
            continue
        try:
            here = out.parent / name
            if kind == "old" and (here / "bundle" / MANIFEST).is_file() and not out.exists() and not out.is_symlink():
                os.rename(here / "bundle", out)  # a kill between the two renames of the fallback swap
            if kind != "export":
                shutil.rmtree(here, ignore_errors=True)
            done.append(name)
        finally:
            if not any((out.parent / f"{prefix}{k}-{token}").exists() for k in ("partial", "old")):
                _release(lock, fd)
            else:
                os.close(fd)
    return done


def _lock_if_free(lock: Path) -> int | None:
    """An fd holding the lock when no live process holds it; None when one does, or it is not hetrun's."""
    try:
        st = os.lstat(lock)
        if not os.path.isfile(lock) or os.path.islink(lock) or st.st_size:
            return None
        fd = os.open(lock, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:  # held by a running export (or no flock here): leave it
        os.close(fd)
        return None


def interrupted_swap(out: Path) -> Path | None:
    """The old bundle a killed `export --force` left beside a missing `out` (fallback swap only), if any."""
    try:
        names = os.listdir(out.parent)
    except OSError:
        return None
    for name in sorted(names):
        if name.startswith(f".{out.name}.old-") and (out.parent / name / "bundle" / MANIFEST).is_file():
            return out.parent / name / "bundle"
    return None


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the OS or the
    filesystem cannot, and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))

"""How liqmon's kernels are compiled (numba), where their machine code is cached, and one
compiler at a time per cache.

Every module with kernels decorates them with `jit` (or a variant) from here, so this module
runs before any kernel is declared: numba picks a kernel's cache directory when the kernel is
declared, and refuses to import a module whose kernels it has nowhere to cache.

**A read-only cache.** numba caches only in a directory it can write: it checks by writing a
file there. The container image ships the kernels compiled into ``NUMBA_CACHE_DIR``, which its
runtime user can only read, on a root filesystem Kubernetes mounts read-only (`deploy/`); numba
would find no usable directory, and liqmon would stop on import. When ``NUMBA_CACHE_DIR``
cannot be written, `use_writable_cache` syncs its contents into a private directory under the
temporary directory (``liqmon-numba-<uid>``; reused, so restarts leave one copy, not one
each) and points numba there: the kernels load from the copy, and any kernel the copy lacks
(a CPU unlike the build machine's, a command whose kernels were not pre-built) compiles into
it instead of failing. Where ``NUMBA_CACHE_DIR`` is not set and numba finds no directory of
its own (a package installed by another user, a service user without a writable home), the
kernels are cached in that private directory too; and where not even that can be made (no
writable temporary directory), they are declared uncached and compile at every start (about a
minute) rather than stop liqmon. `liqmon run` logs which of these it found (`CachePlace`).

**One compiler at a time.** numba writes each kernel's cache index by reading it, adding an
entry and writing it back. Two processes compiling different versions of one kernel at once
can each pick the same data file for theirs, so that an index entry names the other's machine
code (numba issue 10128 reports the segmentation faults that follow). `compiling` holds an
exclusive lock on a file in the cache directory while a process compiles or loads its kernels
(the warm-ups of `monitor.book` and of the restore, for `liqmon run`, the tests and the bench;
`liqmon stress`'s first scenario), so that a second process (the tests' workers, two
instances started together on a fresh machine) waits, then loads what the first compiled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numba
from numba.core import config as numba_config

LOCK_NAME = "liqmon-compile.lock"


def _writable(directory: str) -> bool:
    """numba's own test of a cache directory (a file written there), on the directory and on
    every directory below it (a kernel's cache is a subdirectory)."""
    try:
        os.makedirs(directory, exist_ok=True)
        for root, _, _ in os.walk(directory):
            tempfile.TemporaryFile(dir=root).close()
    except OSError:
        return False
    return True


def _private_directory() -> str | None:
    """``liqmon-numba-<uid>`` in the temporary directory, made if missing; None unless it is
    this user's own and closed to others (another user could have planted code there)."""
    path = os.path.join(tempfile.gettempdir(), f"liqmon-numba-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        status = os.lstat(path)
    except OSError:
        return None
    if (not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid()
            or status.st_mode & 0o077):
        return None
    return path


def _sync(source: str, target: str) -> None:
    """Copy what ``source`` holds into ``target``, skipping files already copied (same size
    and modification time). Each file is written under a temporary name and renamed into
    place, so that a process loading from ``target`` meanwhile never reads half a file. A file
    that cannot be read is left out: its kernel compiles."""
    for root, _, files in os.walk(source):
        into = os.path.join(target, os.path.relpath(root, source))
        os.makedirs(into, exist_ok=True)
        for name in files:
            origin, copy = os.path.join(root, name), os.path.join(into, name)
            staged = f"{copy}.{os.getpid()}.part"
            try:
                want = os.stat(origin)
                with contextlib.suppress(FileNotFoundError):
                    have = os.stat(copy)
                    if (have.st_size, have.st_mtime_ns) == (want.st_size, want.st_mtime_ns):
                        continue
                shutil.copyfile(origin, staged)
                os.utime(staged, ns=(want.st_atime_ns, want.st_mtime_ns))
                os.replace(staged, copy)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(staged)


def _numba_has_a_place() -> bool:
    """Whether numba, left to itself, finds a directory it can cache this package's kernels
    in (beside the package, or the user's cache directory), asked as numba asks at a kernel's
    declaration. True if numba's way of asking has changed: numba then answers for itself."""
    from numba.core import caching

    implementation = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    locators = getattr(implementation, "_locator_classes", None)
    if locators is None or os.environ.get("NUMBA_CACHE_LOCATOR_CLASSES"):
        return True
    return any(locator.from_function(_numba_has_a_place, __file__) is not None
               for locator in locators)


@dataclass(frozen=True)
class CachePlace:
    """Where liqmon had numba cache the kernels, when it had to choose (`use_writable_cache`)."""

    configured: str | None  # NUMBA_CACHE_DIR as it was set, if it was
    used: str | None  # the directory numba now caches in; None: nowhere (compiled every start)

    def describe(self) -> str:
        """What an operator is told at start."""
        if self.used is None:
            return ("numba can cache the compiled kernels nowhere here (no writable temporary "
                    "directory): they compile at every start")
        if self.configured is not None:
            return "the kernels' cache directory cannot be written here: using a copy"
        return ("numba has nowhere to cache the kernels here: caching them in a directory of "
                "liqmon's")


def use_writable_cache(writable: Callable[[str], bool] = _writable,
                       numba_has_a_place: Callable[[], bool] = _numba_has_a_place,
                       ) -> CachePlace | None:
    """If ``NUMBA_CACHE_DIR`` names a directory this process cannot write, cache in a private
    copy of it instead (see the module's docstring); if it is not set and numba has nowhere
    to cache (a package installed by another user, no writable home directory), in a private
    directory; if no private directory can be made either, nowhere: the kernels are then
    declared uncached, and compile at every start rather than stop liqmon. None when numba's
    own choice stands. Child processes inherit the choice through the environment."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured and writable(configured):
        return None
    if not configured and numba_has_a_place():
        return None
    try:
        private = _private_directory()
        if private is None or not writable(private):
            private = tempfile.mkdtemp(prefix="liqmon-numba-")
    except OSError:  # no usable temporary directory at all
        return CachePlace(configured, None)
    if configured and os.path.isdir(configured):
        _sync(configured, private)
    os.environ["NUMBA_CACHE_DIR"] = private
    numba_config.CACHE_DIR = private  # type: ignore[attr-defined]  # set from the env
    return CachePlace(configured, private)


# Before any kernel is declared (numba places its cache then); the service says so at start.
CACHE_PLACE = use_writable_cache()
_CACHED = CACHE_PLACE is None or CACHE_PLACE.used is not None

jit = numba.njit(cache=_CACHED, nogil=True)
jit_parallel = numba.njit(cache=_CACHED, nogil=True, parallel=True)
jit_inline = numba.njit(cache=_CACHED, nogil=True, inline="always")  # inlined where called


def lock_paths() -> list[str]:
    """Where the compile lock may be, in order: in ``NUMBA_CACHE_DIR`` when set, else beside
    the kernels' own cache (``__pycache__`` in the package, where numba caches them when it
    can write there); failing those, this user's one in the temporary directory, if any."""
    configured: str = numba_config.CACHE_DIR  # type: ignore[attr-defined]  # from the env
    directory = configured or os.path.join(os.path.dirname(__file__), "__pycache__")
    paths = [os.path.join(directory, LOCK_NAME)]
    with contextlib.suppress(OSError):  # no usable temporary directory
        paths.append(os.path.join(tempfile.gettempdir(), f"liqmon-compile-{os.getuid()}.lock"))
    return paths


def _acquire(on_wait: Callable[[str], None] | None) -> int | None:
    """The first lock file of `lock_paths` that can be opened (made if missing), opened and
    locked: its descriptor (closing it releases the lock), or None if none can be opened or
    the platform has no ``flock``."""
    try:
        import fcntl  # POSIX, where liqmon runs; elsewhere the block runs unlocked
    except ImportError:
        return None
    for path in lock_paths():
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait(path)
                fcntl.flock(descriptor, fcntl.LOCK_EX)
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor
    return None


_held = threading.local()  # `compiling` is re-entrant within a thread: how deep it is


@contextlib.contextmanager
def compiling(on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the compile lock (see the module's docstring) for the block: compile, or load
    from the cache, inside it. ``on_wait(lock path)`` is called if another process holds it,
    before this one waits. Where no lock file can be opened at all, the block runs unlocked,
    as numba alone would."""
    depth = getattr(_held, "depth", 0)
    descriptor = None if depth else _acquire(on_wait)
    _held.depth = depth + 1
    try:
        yield
    finally:
        _held.depth = depth
        if descriptor is not None:
            os.close(descriptor)  # releases the lock

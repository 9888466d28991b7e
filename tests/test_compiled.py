"""Where the kernels' machine code is cached, and one compiler at a time (monitor/compiled.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from numba.core import config as numba_config

from monitor import compiled
from monitor.compiled import CachePlace, compiling, use_writable_cache
from monitor.service.runner import warm_up_kernels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's directory (where the private copy goes) moved into the test's own."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


@pytest.fixture
def numba_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `use_writable_cache` changes, put back after the test."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba_config, "CACHE_DIR", numba_config.CACHE_DIR)


@pytest.fixture
def read_only_image(tmp_path: Path, numba_settings: None, monkeypatch: pytest.MonkeyPatch
                    ) -> Path:
    """``NUMBA_CACHE_DIR`` set to a cache as the image ships it (a kernel module's index and
    code), which `cache_from` treats as one liqmon cannot write."""
    cache = tmp_path / "image-cache"
    (cache / "book_0123").mkdir(parents=True)
    (cache / "book_0123" / "kernels.account_run-416.py311.nbi").write_bytes(b"index")
    (cache / "book_0123" / "kernels.account_run-416.py311.1.nbc").write_bytes(b"code" * 100)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(cache))
    return cache


def cache_from(image: Path) -> CachePlace | None:
    """`use_writable_cache` where only ``image`` cannot be written."""
    return use_writable_cache(writable=lambda directory: directory != str(image))


def test_a_cache_directory_liqmon_cannot_write_is_copied_and_numba_pointed_at_the_copy(
        temporary_directory: Path, read_only_image: Path) -> None:
    image = read_only_image

    moved = cache_from(image)

    private = temporary_directory / f"liqmon-numba-{os.getuid()}"
    assert moved == CachePlace(str(image), str(private))
    assert os.environ["NUMBA_CACHE_DIR"] == str(private)
    assert str(private) == numba_config.CACHE_DIR
    copied = private / "book_0123"
    assert (copied / "kernels.account_run-416.py311.nbi").read_bytes() == b"index"
    assert (copied / "kernels.account_run-416.py311.1.nbc").read_bytes() == b"code" * 100
    assert private.stat().st_mode & 0o777 == 0o700


def test_a_restart_reuses_its_copy_and_brings_back_what_differs_from_the_image(
        temporary_directory: Path, read_only_image: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    image = read_only_image
    first = cache_from(image)
    assert first is not None and first.used is not None
    private = first.used
    index = Path(private) / "book_0123" / "kernels.account_run-416.py311.nbi"
    index.write_bytes(b"an index numba rewrote after compiling a kernel the image lacked")
    (Path(private) / "book_0123" / "kernels.other-12.py311.nbi").write_bytes(b"compiled here")

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(image))  # the next start, same environment
    moved = cache_from(image)

    assert moved == CachePlace(str(image), private)
    assert index.read_bytes() == b"index"
    assert (Path(private) / "book_0123" / "kernels.other-12.py311.nbi").exists()
    assert not list(Path(private).rglob("*.part"))


def test_a_file_that_cannot_be_copied_is_left_out_and_leaves_nothing_half_written(
        temporary_directory: Path, read_only_image: Path) -> None:
    private = temporary_directory / f"liqmon-numba-{os.getuid()}"
    private.mkdir(mode=0o700)  # from an earlier start, where a directory took the index's name
    (private / "book_0123" / "kernels.account_run-416.py311.nbi").mkdir(parents=True)

    moved = cache_from(read_only_image)

    assert moved == CachePlace(str(read_only_image), str(private))
    assert (private / "book_0123" / "kernels.account_run-416.py311.1.nbc").exists()
    assert not list(private.rglob("*.part"))


def test_a_private_directory_others_could_write_to_is_not_used(
        temporary_directory: Path, read_only_image: Path) -> None:
    planted = temporary_directory / f"liqmon-numba-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)

    moved = cache_from(read_only_image)

    assert moved is not None and moved.used is not None
    assert moved.used != str(planted)
    assert Path(moved.used).parent == temporary_directory
    assert not list(planted.iterdir())


def test_a_writable_cache_directory_is_left_as_configured(
        tmp_path: Path, numba_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))

    assert use_writable_cache() is None
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path)


def test_without_a_configured_directory_numba_chooses_its_own(numba_settings: None) -> None:
    assert use_writable_cache(numba_has_a_place=lambda: True) is None
    assert "NUMBA_CACHE_DIR" not in os.environ


def test_where_numba_has_nowhere_to_cache_liqmon_gives_it_a_private_directory(
        temporary_directory: Path, numba_settings: None) -> None:
    moved = use_writable_cache(numba_has_a_place=lambda: False)

    private = str(temporary_directory / f"liqmon-numba-{os.getuid()}")
    assert moved == CachePlace(None, private)
    assert os.environ["NUMBA_CACHE_DIR"] == private


def test_numba_is_asked_where_it_would_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from numba.core import caching

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    assert compiled._numba_has_a_place()  # the tests' checkout: numba caches in __pycache__

    def unwritable(self: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(caching._CacheLocator, "ensure_cache_path", unwritable)
    assert not compiled._numba_has_a_place()


def run_a_kernel(directory: Path, cache: Path, first_lines: str = "",
                 env: dict[str, str] | None = None) -> str:
    """What a process prints (CACHE_PLACE, described) that declares a kernel of its own in
    ``directory``, with ``NUMBA_CACHE_DIR`` at ``cache``, and runs it."""
    module = directory / "one_kernel.py"
    module.write_text(first_lines + textwrap.dedent("""
        from monitor.compiled import CACHE_PLACE, jit

        @jit
        def double(x):
            return 2 * x

        assert double(21) == 42
        print(CACHE_PLACE.used, CACHE_PLACE.describe())
    """))
    run = subprocess.run([sys.executable, str(module)], capture_output=True, text=True,
                         timeout=120, check=False,
                         env={**os.environ, **(env or {}), "NUMBA_CACHE_DIR": str(cache),
                              "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_kernels_compile_into_the_copy_when_the_configured_directory_cannot_be_made(
        tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")

    said = run_a_kernel(tmp_path, a_file / "cache", env={"TMPDIR": str(tmp_path)})

    private = tmp_path / f"liqmon-numba-{os.getuid()}"
    assert said == f"{private} the kernels' cache directory cannot be written here: using a copy\n"
    assert list(private.rglob("one_kernel.double-*.nbi"))


def test_with_no_temporary_directory_either_the_kernels_compile_uncached(
        tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")

    said = run_a_kernel(tmp_path, a_file / "cache",
                        first_lines=f"import tempfile\ntempfile.tempdir = {str(a_file)!r}\n")

    assert said.startswith("None numba can cache the compiled kernels nowhere here")
    assert not list(tmp_path.rglob("*.nbi"))


def holding_the_lock(cache: Path) -> subprocess.Popen[str]:
    """Another process holding the compile lock of ``cache`` until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from monitor.compiled import compiling
            with compiling():
                print("held", flush=True)
                sys.stdin.read()
        """)], env={**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_second_process_waits_for_the_compile_lock_then_compiles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numba_config, "CACHE_DIR", str(tmp_path))
    with compiling():
        waiter = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent("""
                from monitor.compiled import compiling
                with compiling(lambda path: print("waiting on", path, flush=True)):
                    print("compiling", flush=True)
            """)], env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path),
                        "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE, text=True)
        assert waiter.stdout is not None
        assert waiter.stdout.readline() == f"waiting on {tmp_path / compiled.LOCK_NAME}\n"
    assert waiter.stdout.readline() == "compiling\n"
    assert waiter.wait(timeout=60) == 0


def test_warm_up_waits_while_another_process_compiles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numba_config, "CACHE_DIR", str(tmp_path))
    holder = holding_the_lock(tmp_path)
    waiting = threading.Event()
    warmed: list[float] = []
    warm = threading.Thread(target=lambda: warmed.append(
        warm_up_kernels(on_wait=lambda path: waiting.set())))
    warm.start()
    try:
        assert waiting.wait(timeout=60)
        assert not warmed  # still waiting for the lock
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    warm.join(timeout=120)
    assert warmed


def test_the_lock_is_taken_again_within_a_process_without_waiting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numba_config, "CACHE_DIR", str(tmp_path))
    waits: list[str] = []
    with compiling(waits.append), compiling(waits.append):
        pass
    assert waits == []


def test_with_no_lock_file_anywhere_the_block_runs_unlocked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setattr(numba_config, "CACHE_DIR", str(a_file / "cache"))

    def no_temporary_directory() -> str:
        raise FileNotFoundError("No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", no_temporary_directory)
    ran = []
    with compiling():
        ran.append(True)
    assert ran == [True]

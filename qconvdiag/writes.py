"""Output files (``--output``, ``--save-outputs``, ``--save``, ``save_case``).

Every destination is checked, and its temporary file created beside it, before any work
(``PendingWrites.reserve``); the data goes to the temporary files; ``commit`` renames them over
the destinations only when every one was written. A failed or interrupted run removes its
temporary files and leaves every destination as it was. Only regular files and new paths are
written: a directory, device, FIFO or socket is refused and left untouched (a rename would
replace a device node such as ``/dev/full`` with a file).
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

#: Bytes per write call.
WRITE_CHUNK = 4 << 20


@dataclass
class Destination:
    """One output file: where it goes and the temporary file that will become it."""

    label: str
    """How the user named it (``--output r.json``), for messages."""
    path: Path
    """The path as given."""
    target: Path
    """The file that gets replaced: ``path`` with symlinks resolved (a link is written through,
    not replaced)."""
    tmp: Path
    """The temporary file beside ``target``."""
    written: bool = False
    committed: bool = False


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(target: Path) -> int:
    """Permissions of a written file, as ``open(target, "w")`` (and so ``torch.save``) would
    leave them: an existing file keeps its own, a new one gets 0666 minus the umask (0644 with
    the usual umask 022). mkstemp's temporary files are 0600."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~umask()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync directories; the rename is still atomic
    finally:
        os.close(fd)


def _same_existing_file(a: Path, b: Path) -> bool:
    """Two names of one existing file (hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class PendingWrites:
    """Output files put in place together, or not at all. Use as a context manager: leaving it
    without ``commit`` (an error, Ctrl-C) removes the temporary files."""

    def __init__(self) -> None:
        self._destinations: list[Destination] = []

    def __enter__(self) -> PendingWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def reserve(self, path: str | os.PathLike[str], option: str = "",
                formats: tuple[str, ...] = (), what: str = "") -> Destination:
        """Check that ``path`` can be written and create its temporary file (empty) beside it.
        ``formats``: the extensions allowed (the extension names the format, one rule for
        every file written), ``what`` the file's content for the message. Raises UsageError
        with a fix when the path cannot be used."""
        p = Path(path)
        label = f"{option} {p}" if option else str(p)
        target = Path(os.path.realpath(p))
        for other in self._destinations:
            if other.target == target or _same_existing_file(other.target, target):
                raise UsageError(f"{label} names the same file as {other.label}: give each "
                                 "its own file")
        try:
            mode: int | None = os.stat(target).st_mode
        except (FileNotFoundError, NotADirectoryError):
            mode = None
        except OSError as exc:
            raise UsageError(f"{label}: cannot use this path ({exc.strerror}); write elsewhere"
                             ) from None
        if mode is not None and not stat.S_ISREG(mode):
            raise UsageError(
                f"{label} is {_kind(mode)}: qconvdiag writes only regular files or new paths; "
                "give a file name"
            )
        parent = target.parent
        if not parent.exists():
            raise UsageError(f"{label}: directory {parent} does not exist; create it first or "
                             "write elsewhere")
        if not parent.is_dir():
            raise UsageError(f"{label}: {parent} is not a directory; write elsewhere")
        if formats and p.suffix.lower() not in formats:
            raise UsageError(
                f"{label}: {what or 'the file'} needs a name ending in {' or '.join(formats)} "
                f"(the extension names the format), e.g. {p.stem or 'out'}{formats[0]}"
            )
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                            dir=parent)
        except OSError as exc:
            raise UsageError(f"{label}: cannot create a file in {parent} ({exc.strerror}); "
                             "write elsewhere") from None
        os.close(fd)
        dest = Destination(label, p, target, Path(tmp_name))
        self._destinations.append(dest)
        return dest

    def write(self, dest: Destination, data: bytes) -> None:
        """Write ``data`` to the destination's temporary file (not yet in place), with the
        permissions the file will keep (see ``file_mode``), and flush it to disk."""
        fd = os.open(dest.tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            os.fchmod(fd, file_mode(dest.target))
            view = memoryview(data)
            while view:  # in chunks: Ctrl-C is handled between them, not after 500 MB
                view = view[os.write(fd, view[:WRITE_CHUNK]):]
            # on disk before the rename, or a crash could leave an empty file in its place
            os.fsync(fd)
        finally:
            os.close(fd)
        dest.written = True

    def commit(self) -> list[Destination]:
        """Rename every written temporary file over its destination, in reserve order."""
        pending = [d for d in self._destinations if not d.committed]
        missing = [d.label for d in pending if not d.written]
        if missing:
            raise RuntimeError(f"commit before writing {', '.join(missing)}")
        for d in pending:
            os.replace(d.tmp, d.target)
            d.committed = True
        for folder in {d.target.parent for d in pending}:
            _fsync_directory(folder)  # the renames themselves on disk
        return pending

    def discard(self) -> None:
        """Remove the temporary files of every destination not committed."""
        for d in self._destinations:
            if not d.committed:
                d.tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    with PendingWrites() as writes:
        writes.write(writes.reserve(path), data)
        writes.commit()
    return Path(path)

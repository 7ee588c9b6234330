"""What tells one version of a file the dispatcher reads from another.

Its modification time alone does not: an image built reproducibly, or a copy that
keeps times (``cp -p``, ``rsync -t``), gives every version the same one, and a
ConfigMap's update swaps a symbolic link between directories whose files may have
equal times. The stamp adds the change time, which every write, rename or change of
times moves and no user can set back, the size, and the device and inode of the
file the path leads to now (a file renamed over it, or a link pointed elsewhere,
is another file).
"""

from __future__ import annotations

import errno
import os
import stat

Stamp = tuple[int, int, int, int, int]


def stamp(path: str | os.PathLike[str]) -> Stamp:
    """The stamp of the file at ``path``, following links; OSError if none."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_dev, st.st_ino)


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file at ``path``; OSError if there is none.

    Opened without blocking, and refused unless regular: reading a FIFO put in
    a file's place would wait for a writer for ever, and hold the event loop
    with it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)

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

import os

Stamp = tuple[int, int, int, int, int]


def stamp(path: str | os.PathLike[str]) -> Stamp:
    """The stamp of the file at ``path``, following links; OSError if none."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_dev, st.st_ino)

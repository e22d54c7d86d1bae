"""The one way the project writes a file: whole or not at all, even across a crash or a kill."""
import contextlib
import csv
import glob
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Yields a file object for a temporary file beside `path`; on success it is flushed, fsynced and
    renamed over `path` (readers see the old file or the new one, never a part); on error it is removed.
    Temporary files of `path` that a killed write left behind are removed first."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.tmp-"
    for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself survives a power cut only once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def write_text(path, text):
    with atomic_write(path) as f:
        f.write(text)


def write_csv(path, rows):
    """rows: dicts with the same keys (the header), in order."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

"""Writing .npz files atomically (KL base files, importance matrices, sessions): a temporary file
beside the target, fsync, rename; on failure nothing is left behind and the old file stays."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InferError


def write_npz_atomic(path, arrays: dict, what: str, error: type[InferError] = InferError) -> Path:
    """Write `arrays` to `path`; an OSError becomes `error("<path>: cannot write <what> (...)")`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(f"{path}: cannot write {what} ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

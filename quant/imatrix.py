"""Importance matrices: per-input-channel activation statistics of every matmul weight of a model.

For a weight W (rows, cols) applied as y = W a, column j of W multiplies activation a_j; an
error e_j in that column costs about e_j^2 * E[a_j^2] in the output. The importance matrix stores,
per weight tensor, the sum of a_j^2 over the calibration tokens and their count, so that
`importance(name)` = E[a_j^2] (what the weighted quantizers of quant/weighted.py minimize against).

    im = ImportanceMatrix(model={...})        # identity of the model it is computed on
    im.add("blk.0.attn_q.weight", h)          # h: (n, cols) activations entering that matmul
    im.save("stats.imatrix.npz");  im = ImportanceMatrix.load("stats.imatrix.npz")
    im.check_model(identity, shapes, what)    # raises ImatrixError if it was computed on another model

File format: an .npz without pickled objects (np.load(allow_pickle=False) reads it), written
atomically: `format` ("infer-imatrix-1"), the identity of the model (`model_*` scalars), what it
was computed on (`source_*`), `names` (n,) str, `counts` (n,) int64, `lengths` (n,) int64, and
`sums` (sum of lengths,) float64, the tensors' sums one after another.

A tied model (no output.weight) has its output matmul recorded under token_embd.weight, the tensor
that matmul uses; an untied model's token_embd.weight (a lookup table) has no entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infer.errors import InferError
from infer.npz_file import write_npz_atomic

FORMAT = "infer-imatrix-1"
IDENTITY = ("arch", "n_layers", "n_embd", "n_ff", "n_heads", "n_kv_heads", "n_vocab")


class ImatrixError(InferError):
    """An importance-matrix file cannot be read, or does not belong to the model at hand."""


@dataclass
class ImportanceMatrix:
    model: dict                                   # IDENTITY keys (+ "name", "file", "weights")
    source: dict = field(default_factory=dict)    # "text", "n_ctx", "n_chunks", "n_tokens"
    sums: dict = field(default_factory=dict)      # tensor name -> (cols,) float64 sum of a_j^2
    counts: dict = field(default_factory=dict)    # tensor name -> activation rows accumulated

    def add(self, name: str, h: np.ndarray) -> None:
        """Accumulate activations h (n, cols) entering the matmul of tensor `name`."""
        h = np.asarray(h, np.float64)
        s = self.sums.get(name)
        if s is None:
            s = self.sums[name] = np.zeros(h.shape[1], np.float64)
            self.counts[name] = 0
        s += np.einsum("ij,ij->j", h, h)
        self.counts[name] += h.shape[0]

    def importance(self, name: str) -> np.ndarray | None:
        """E[a_j^2] per input channel of tensor `name` (None when it has no entry)."""
        s = self.sums.get(name)
        if s is None or not self.counts.get(name):
            return None
        return s / self.counts[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def __len__(self) -> int:
        return len(self.sums)

    def describe(self) -> str:
        m, s = self.model, self.source
        return (f"{len(self)} tensors of {m.get('name') or m.get('arch')} ({m.get('arch')}, {m.get('n_layers')} "
                f"layers, dim {m.get('n_embd')}), {s.get('n_tokens', '?')} tokens of {s.get('text', '?')}")

    # --- the model it belongs to --------------------------------------------------------------
    def check_model(self, identity: dict, shapes: dict, what: str) -> None:
        """Raise ImatrixError unless this matrix was computed on a model like `identity` (IDENTITY
        keys) whose weights have these shapes: {name: (rows, cols)} of the tensors to quantize with it.
        Tensors of `shapes` without an entry are an error, except token_embd.weight (a lookup table
        in an untied model)."""
        for k in IDENTITY:
            if k in identity and k in self.model and identity[k] != self.model[k]:
                raise ImatrixError(
                    f"{what}: the importance matrix was computed on another model ({self._ident(self.model)}; "
                    f"this one is {self._ident(identity)})")
        for name, shape in shapes.items():
            s = self.sums.get(name)
            if s is None:
                if name == "token_embd.weight":
                    continue
                raise ImatrixError(f"{what}: the importance matrix has no entry for {name} (computed on "
                                   f"another model? it has {len(self)} tensors)")
            if s.shape[0] != shape[-1]:
                raise ImatrixError(f"{what}: the importance matrix has {s.shape[0]} channels for {name}, which "
                                   f"has rows of {shape[-1]} (computed on another model?)")

    @staticmethod
    def _ident(m: dict) -> str:
        return (f"{m.get('arch')}, {m.get('n_layers')} layers, dim {m.get('n_embd')}, ff {m.get('n_ff')}, "
                f"vocab {m.get('n_vocab')}")

    # --- file ---------------------------------------------------------------------------------
    def save(self, path) -> Path:
        path = Path(path)
        if not path.parent.is_dir():
            raise ImatrixError(f"{path}: cannot write the importance matrix (no such directory)")
        names = sorted(self.sums)
        arrays = {"format": np.array(FORMAT),
                  "names": np.array(names, dtype=str),
                  "counts": np.array([self.counts[n] for n in names], np.int64),
                  "lengths": np.array([self.sums[n].shape[0] for n in names], np.int64),
                  "sums": (np.concatenate([self.sums[n] for n in names]) if names else np.zeros(0))}
        for k, v in self.model.items():
            arrays[f"model_{k}"] = np.array(v)
        for k, v in self.source.items():
            arrays[f"source_{k}"] = np.array(v)
        write_npz_atomic(path, arrays, "the importance matrix", ImatrixError)
        return path

    @classmethod
    def load(cls, path) -> "ImportanceMatrix":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise ImatrixError(f"{path}: importance matrix file not found (make one with `infer calibrate`)") from None
        except IsADirectoryError:
            raise ImatrixError(f"{path}: is a directory, not an importance matrix file") from None
        except (OSError, ValueError, EOFError) as e:
            raise ImatrixError(f"{path}: not an importance matrix file ({str(e).splitlines()[0] if str(e) else e})") from None
        if "format" not in a or a["format"].shape != () or str(a["format"]) != FORMAT:
            got = str(a["format"]) if "format" in a and a["format"].shape == () else "none"
            raise ImatrixError(f"{path}: not an infer importance matrix (format {got!r}, expected {FORMAT})")
        try:
            names = [str(n) for n in a["names"]]
            counts, lengths, sums = a["counts"], a["lengths"], a["sums"]
            ok = (counts.shape == lengths.shape == (len(names),) and sums.ndim == 1
                  and np.issubdtype(counts.dtype, np.integer) and np.issubdtype(lengths.dtype, np.integer)
                  and np.issubdtype(sums.dtype, np.floating) and (lengths > 0).all() and (counts >= 0).all()
                  and int(lengths.sum()) == sums.shape[0] and np.isfinite(sums).all() and (sums >= 0).all())
        except KeyError as e:
            raise ImatrixError(f"{path}: importance matrix file lacks {e.args[0]!r}") from None
        if not ok:
            raise ImatrixError(f"{path}: importance matrix file is inconsistent (names, counts, lengths, sums)")
        model = {k[6:]: v.item() for k, v in a.items() if k.startswith("model_")}
        source = {k[7:]: v.item() for k, v in a.items() if k.startswith("source_")}
        if "arch" not in model:
            raise ImatrixError(f"{path}: importance matrix file does not say which model it belongs to")
        im = cls(model=model, source=source)
        off = 0
        for n, c, ln in zip(names, counts, lengths):
            im.sums[n] = sums[off:off + int(ln)].astype(np.float64)
            im.counts[n] = int(c)
            off += int(ln)
        return im

"""Hugging Face safetensors folder -> GGUF file, streaming, atomic.

    plan = make_plan(src, "q8_0")            # reads config, headers and tokenizer; validates; no weights
    summary = convert(src, dst, "q8_0")      # plan, then write dst (temp file in dst's folder + rename)

Steps: config.json -> HParams (arch.py); safetensors headers -> tensors mapped to GGUF names and
checked against the shapes config.json implies; recipe -> a type per tensor (quant/recipes.py);
metadata in llama.cpp's order (general.*, {arch}.*, general.quantization_version, tokenizer.*);
then the header, then each tensor read in bands of rows (~16 MB of float32), permuted (llama q/k),
quantized (Numba) and written. Peak memory: one band plus the metadata, whatever the model size.
Any error or Ctrl-C removes the temporary file; an existing dst is replaced only with force=True.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from infer.errors import ConvertError
from infer.quant.recipes import Recipe, get_recipe, plan_type
from infer.quant.types import F32, QType

from .arch import ArchSpec, HParams, expected_tensors, llama3_rope_factors, map_tensor, phi3_rope
from .gguf_writer import MetaRecorder, StreamWriter, TensorSlot, file_size, header_bytes
from .safetensors import FLOAT_DTYPES, Checkpoint, TensorEntry
from .vocab import load_json, write_vocab

log = logging.getLogger("infer.convert")

BAND_ELEMENTS = 4 * 1024 * 1024          # rows read / quantized / written at a time (16 MB of float32)
QUANTIZATION_VERSION = 2

ProgressFn = Callable[[str, int, int], None]   # (tensor name, bytes written so far, total bytes)


@dataclass
class TensorPlan:
    name: str                    # GGUF name
    shape: tuple                 # numpy order
    qtype: QType
    nbytes: int
    src: TensorEntry | None      # None for generated tensors
    permute_heads: int = 0
    data: np.ndarray | None = None
    shift: float = 0.0           # added to a 1-D tensor's values (Gemma's norms: 1 + w)

    @property
    def src_dtype(self) -> str:
        return self.src.dtype if self.src is not None else "F32"


@dataclass
class Plan:
    src: Path
    recipe: Recipe
    hp: HParams
    spec: ArchSpec
    tensors: list[TensorPlan]
    kv: list
    vocab: str
    checkpoint: Checkpoint
    header: bytes = b""
    imatrix: object = None       # an ImportanceMatrix: Q4_0/Q4_1 blocks minimize the weighted error

    @property
    def file_size(self) -> int:
        return file_size(len(self.header), self.slots())

    def slots(self) -> list[TensorSlot]:
        return [TensorSlot(t.name, t.shape, t.qtype.id, t.nbytes) for t in self.tensors]

    def table(self) -> str:
        """The per-tensor plan, one line per tensor, and the totals."""
        w = max((len(t.name) for t in self.tensors), default=10)
        lines = [f"{'tensor':<{w}}  {'shape (ggml order)':<20} {'from':<5} -> {'type':<5} {'bytes':>12}"]
        for t in self.tensors:
            dims = "{" + ", ".join(str(d) for d in reversed(t.shape)) + "}"
            lines.append(f"{t.name:<{w}}  {dims:<20} {t.src_dtype:<5} -> {t.qtype.name:<5} {t.nbytes:>12,}")
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        mix = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        lines.append(f"{len(self.tensors)} tensors ({mix}); {self.hp.hf_arch} -> {self.spec.gguf_arch}; "
                     f"vocabulary: {self.vocab}")
        lines.append(f"expected file size: {self.file_size:,} bytes ({self.file_size / 1e6:.1f} MB)")
        return "\n".join(lines)


@dataclass
class ConvertSummary:
    src: Path
    dst: Path | None
    type: str
    arch: str
    n_tensors: int
    n_bytes: int                 # size of the GGUF file (expected size for a dry run)
    seconds: float
    dry_run: bool
    vocab: str
    tensors: list[TensorPlan] = field(repr=False, default_factory=list)

    def __str__(self) -> str:
        what = "would write" if self.dry_run else "wrote"
        return (f"{what} {self.dst} ({self.arch}, {self.type}): {self.n_tensors} tensors, "
                f"{self.n_bytes / 1e6:.1f} MB in {self.seconds:.1f} s")


def _row_bytes(qt: QType, shape: tuple) -> int:
    cols = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * qt.row_bytes(cols)


def _general_metadata(w: MetaRecorder, src: Path, total_params: int) -> None:
    """general.* as llama.cpp writes them (gguf-py's Metadata heuristics: name from the folder or
    the model card, size label, sampling defaults from generation_config.json, ...)."""
    import gguf
    try:
        meta = gguf.Metadata.load(None, src, None, total_params)
        if meta.name is None:
            meta.name = src.name
        if meta.size_label is None and total_params > 0:
            meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
        meta.set_gguf_meta_model(w)
    except Exception as e:        # a malformed model card must not stop a conversion
        log.warning("%s: model card metadata skipped (%s)", src, e)
        w.add_name(src.name)


def _phi3_metadata(w: MetaRecorder, hp: HParams, recipe: Recipe, rope: dict) -> None:
    """The keys of llama.cpp's Phi3MiniModel.set_gguf_parameters, in its order (no rope.scaling.type:
    LongRoPE is the factor tensors and rope.scaling.attn_factor, written first: see plan)."""
    a = "phi3"
    if hp.n_ctx is not None:
        w.add_uint32(f"{a}.context_length", int(hp.n_ctx))
    w.add_uint32(f"{a}.rope.scaling.original_context_length", rope["orig_ctx"])
    w.add_uint32(f"{a}.embedding_length", hp.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", hp.n_ff)
    w.add_uint32(f"{a}.block_count", hp.n_layer)
    w.add_uint32(f"{a}.attention.head_count", hp.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", hp.n_head_kv)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", hp.rms_eps)
    w.add_uint32(f"{a}.rope.dimension_count", rope["rope_dims"])
    w.add_float32(f"{a}.rope.freq_base", hp.rope_theta)
    w.add_uint32("general.file_type", recipe.file_type)
    sw = hp.raw.get("sliding_window")
    w.add_uint32(f"{a}.attention.sliding_window", int(sw) if isinstance(sw, int) and sw > 0 else 0)
    w.add_uint32("general.quantization_version", QUANTIZATION_VERSION)


def _model_metadata(w: MetaRecorder, hp: HParams, spec: ArchSpec, recipe: Recipe, phi3: dict | None = None) -> None:
    a = spec.gguf_arch
    if spec.phi3:
        return _phi3_metadata(w, hp, recipe, phi3)
    w.add_uint32(f"{a}.block_count", hp.n_layer)
    if hp.n_ctx is not None:
        w.add_uint32(f"{a}.context_length", int(hp.n_ctx))
    w.add_uint32(f"{a}.embedding_length", hp.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", hp.n_ff)
    w.add_uint32(f"{a}.attention.head_count", hp.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", hp.n_head_kv)
    rope_type = hp.rope.get("rope_type")
    factor = hp.rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_string(f"{a}.rope.scaling.type", "linear")
        w.add_float32(f"{a}.rope.scaling.factor", float(factor))
    elif rope_type == "yarn" and factor is not None:
        w.add_string(f"{a}.rope.scaling.type", "yarn")
        w.add_float32(f"{a}.rope.scaling.factor", float(factor))
        if "original_max_position_embeddings" in hp.rope:
            w.add_uint32(f"{a}.rope.scaling.original_context_length", int(hp.rope["original_max_position_embeddings"]))
    elif rope_type not in (None, "default", "llama3"):
        raise ConvertError(f"rope type {rope_type!r} is not supported (default, linear, yarn, llama3)")
    if hp.rope_theta is not None:
        w.add_float32(f"{a}.rope.freq_base", hp.rope_theta)
    if hp.rope_theta_swa is not None:       # written for any architecture, as llama.cpp's converter does
        w.add_float32(f"{a}.rope.freq_base_swa", hp.rope_theta_swa)
    if hp.rms_eps is not None:
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", hp.rms_eps)
    if spec.always_head_dim or hp.head_dim_in_config:
        w.add_uint32(f"{a}.attention.key_length", hp.head_dim)
        w.add_uint32(f"{a}.attention.value_length", hp.head_dim)
    w.add_uint32("general.file_type", recipe.file_type)
    if spec.gemma:          # after file_type, in llama.cpp's order (its Gemma3Model adds them)
        raw = hp.raw
        if raw.get("final_logit_softcapping"):
            w.add_float32(f"{a}.final_logit_softcapping", float(raw["final_logit_softcapping"]))
        if raw.get("sliding_window_pattern") != 1 and raw.get("sliding_window"):
            w.add_uint32(f"{a}.attention.sliding_window", int(raw["sliding_window"]))
    if spec.vocab_and_rope_dim:
        w.add_uint32(f"{a}.vocab_size", hp.n_vocab)
        w.add_uint32(f"{a}.rope.dimension_count", hp.head_dim)
    w.add_uint32("general.quantization_version", QUANTIZATION_VERSION)


def make_plan(src, type: str = "q8_0") -> Plan:
    """Read and validate everything but the weights; the plan holds the open checkpoint."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such folder")
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder (give the Hugging Face model folder)")
    try:
        recipe = get_recipe(type)
    except KeyError as e:
        raise ConvertError(str(e.args[0])) from None
    cfg_path = src / "config.json"
    cfg = load_json(cfg_path, required=True)
    hp, spec = HParams.from_config(cfg, cfg_path)
    ckpt = Checkpoint(src)
    try:
        tensors: list[TensorPlan] = []
        seen: dict[str, str] = {}
        for hf_name, e in ckpt.tensors.items():
            m = map_tensor(spec, hp, hf_name)
            if m is None:
                continue
            if e.dtype not in FLOAT_DTYPES:
                raise ConvertError(f"{e.path}: tensor {hf_name!r} has dtype {e.dtype}; "
                                   f"only {', '.join(FLOAT_DTYPES)} can be converted")
            if e.shape != m.shape:
                raise ConvertError(f"{e.path}: tensor {hf_name!r} has shape {list(e.shape)} but config.json "
                                   f"implies {list(m.shape)}")
            if m.permute_heads and m.shape[0] % (2 * m.permute_heads):
                raise ConvertError(f"{e.path}: tensor {hf_name!r}: {m.shape[0]} rows do not split into "
                                   f"{m.permute_heads} heads of even size")
            seen[hf_name] = m.name
            qt = plan_type(recipe, m.name, e.shape, hp.n_layer)
            tensors.append(TensorPlan(m.name, e.shape, qt, _row_bytes(qt, e.shape), e, m.permute_heads,
                                      shift=m.shift))
        for hf_name, m in expected_tensors(spec, hp).items():
            if m.required and hf_name not in seen:
                raise ConvertError(f"{src}: missing tensor {hf_name!r} ({m.name}) in the checkpoint")
        factors = llama3_rope_factors(hp) if spec.gguf_arch in ("llama", "smollm3") else None
        if factors is not None:
            data = np.asarray(factors, dtype=np.float32)
            tensors.insert(0, TensorPlan("rope_freqs.weight", data.shape, F32, data.nbytes, None, 0, data))
        rope = phi3_rope(hp, cfg_path) if spec.phi3 else None
        if rope is not None:    # LongRoPE: the long and short factors, first, as llama.cpp writes them
            if rope["long"] is not None:
                extra = [("rope_factors_long.weight", rope["long"]), ("rope_factors_short.weight", rope["short"])]
                tensors[:0] = [TensorPlan(n, (len(f),), F32, 4 * len(f), None, 0, np.asarray(f, np.float32))
                               for n, f in extra]

        w = MetaRecorder(spec.gguf_arch)
        if rope is not None and rope["attn_factor"] is not None:
            # llama.cpp's Phi3MiniModel writes it while preparing the tensors (generate_extra_tensors),
            # before the rest of the metadata: right after general.architecture
            w.add_float32("phi3.rope.scaling.attn_factor", rope["attn_factor"])
        w.add_type("model")
        total = sum(int(np.prod(t.shape)) for t in tensors)
        _general_metadata(w, src, total)
        _model_metadata(w, hp, spec, recipe, rope)
        vocab = write_vocab(w, src, spec.gguf_arch, hp.n_vocab)
        plan = Plan(src, recipe, hp, spec, tensors, w.items(), vocab, ckpt)
        plan.header = header_bytes(plan.kv, plan.slots())
        return plan
    except BaseException:
        ckpt.close()
        raise


def _encode(x: np.ndarray, qt: QType) -> np.ndarray:
    from infer.quant.quantize import quantize_rows
    return quantize_rows(x, qt)


def _encode_weighted(x: np.ndarray, qt: QType, importance: np.ndarray) -> np.ndarray:
    from infer.quant.weighted import quantize_rows_weighted
    return quantize_rows_weighted(x, qt, importance)


def identity(hp: HParams, spec: ArchSpec) -> dict:
    """The model identity an importance matrix records (quant/imatrix.py IDENTITY)."""
    return {"arch": spec.gguf_arch, "n_layers": hp.n_layer, "n_embd": hp.n_embd, "n_ff": hp.n_ff,
            "n_heads": hp.n_head, "n_kv_heads": hp.n_head_kv, "n_vocab": hp.n_vocab}


def attach_imatrix(plan: Plan, imatrix) -> None:
    """Use `imatrix` (an ImportanceMatrix or a path to one) for the plan's Q4_0/Q4_1 tensors, after
    checking that it belongs to this model (ImatrixError, an InferError, if not)."""
    from infer.quant.imatrix import ImportanceMatrix
    what = str(imatrix) if not isinstance(imatrix, ImportanceMatrix) else "importance matrix"
    if not isinstance(imatrix, ImportanceMatrix):
        imatrix = ImportanceMatrix.load(imatrix)
    shapes = {t.name: t.shape for t in plan.tensors if t.qtype.name in ("Q4_0", "Q4_1") and t.src is not None}
    if not shapes:
        raise ConvertError(f"--type {plan.recipe.name} has no Q4_0/Q4_1 tensors: an importance matrix only "
                           f"applies to q4_0, q4_1 and the mixed recipes")
    imatrix.check_model(identity(plan.hp, plan.spec), shapes, what)
    plan.imatrix = imatrix
    # recorded as llama-quantize records its imatrix (quantize.imatrix.*)
    import gguf
    w = MetaRecorder(plan.spec.gguf_arch)
    w.add_string("quantize.imatrix.file", os.path.basename(what))
    w.add_string("quantize.imatrix.dataset", str(imatrix.source.get("text", "")))
    w.add_uint32("quantize.imatrix.entries_count", len(imatrix))
    w.add_uint32("quantize.imatrix.chunks_count", int(imatrix.source.get("n_chunks", 0)))
    plan.kv = plan.kv + [kv for kv in w.items() if kv[0] != gguf.Keys.General.ARCHITECTURE]
    plan.header = header_bytes(plan.kv, plan.slots())


def _stream_tensor(ckpt: Checkpoint, t: TensorPlan, out: StreamWriter, tick: Callable[[int], None],
                   imatrix=None) -> None:
    if t.data is not None:
        b = _encode(t.data.reshape(1, -1), t.qtype)
        out.write(b)
        tick(b.nbytes)
        return
    e = t.src
    if len(t.shape) == 1:
        x = ckpt.read_f32(e)
        if t.permute_heads:
            hd = x.size // t.permute_heads
            x = x.reshape(t.permute_heads, 2, hd // 2).swapaxes(1, 2).reshape(-1)
        if t.shift:
            x = x + np.float32(t.shift)
        b = _encode(x.reshape(1, -1), t.qtype)
        out.write(b)
        tick(b.nbytes)
        return
    rows, cols = t.shape
    importance = None
    if imatrix is not None and t.qtype.name in ("Q4_0", "Q4_1"):
        importance = imatrix.importance(t.name)      # None for an untied token_embd (a lookup table)
    step = max(1, BAND_ELEMENTS // cols)
    if t.permute_heads:
        hd = rows // t.permute_heads
        step = max(hd, step // hd * hd)          # whole heads per band: the permutation stays inside
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = ckpt.read_f32(e, r0 * cols, (r1 - r0) * cols).reshape(r1 - r0, cols)
        if t.permute_heads:
            x = np.ascontiguousarray(x.reshape(-1, 2, hd // 2, cols).swapaxes(1, 2)).reshape(r1 - r0, cols)
        if t.qtype.block_size > 1 and not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise ConvertError(f"{e.path}: tensor {e.name!r} has a non-finite value ({x[tuple(bad)]}) in row "
                               f"{r0 + int(bad[0])}; it cannot be quantized (convert to f16/f32 to keep it as is)")
        b = _encode(x, t.qtype) if importance is None else _encode_weighted(x, t.qtype, importance)
        out.write(b)
        tick(b.nbytes)
        del x, b


def _temp_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.{os.getpid()}.partial"


def write_plan(plan: Plan, dst: Path, force: bool = False, progress: ProgressFn | None = None) -> None:
    """Write `plan` to dst through a temporary file in dst's folder, renamed at the end."""
    _check_dst(dst, force)
    tmp = _temp_path(dst)
    total = plan.file_size
    done = len(plan.header)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise ConvertError(f"{dst}: cannot create a file in {dst.parent} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            out = StreamWriter(f, plan.kv, plan.slots())
            for t in plan.tensors:
                out.begin(t.name)

                def tick(n, name=t.name):
                    nonlocal done
                    done += n
                    if progress is not None:
                        progress(name, done, total)
                _stream_tensor(plan.checkpoint, t, out, tick, plan.imatrix)
            out.finish()
            f.flush()
            os.fsync(f.fileno())
        if os.path.getsize(tmp) != total:
            raise ConvertError(f"{dst}: internal error: wrote {os.path.getsize(tmp)} bytes, planned {total}")
        _check_dst(dst, force)
        os.replace(tmp, dst)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, ConvertError):
            raise ConvertError(f"{dst}: write failed ({exc.strerror or exc})") from None
        raise


def _check_dst(dst: Path, force: bool) -> None:
    if dst.is_dir():
        raise ConvertError(f"{dst}: is a folder; give the output file name (e.g. {dst / 'model.gguf'})")
    if not dst.parent.is_dir():
        raise ConvertError(f"{dst}: folder {dst.parent} does not exist")
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists (use --force / force=True to overwrite)")


def convert(src, dst=None, type: str = "q8_0", *, force: bool = False, dry_run: bool = False,
            progress: ProgressFn | None = None, imatrix=None) -> ConvertSummary:
    """Convert the Hugging Face folder `src` to the GGUF file `dst` with recipe `type`.

    type: f32, f16, bf16, q8_0 (default), q4_0, q4_1, q4_0_mixed, q4_1_mixed (see infer.quant.recipes).
    dry_run: validate and plan only (dst may be None); the summary's n_bytes is the expected size.
    progress: called as progress(tensor_name, bytes_done, bytes_total) while writing.
    imatrix: an ImportanceMatrix (infer.calibrate) or the path of a saved one: the Q4_0 / Q4_1
        tensors get the blocks that minimize the importance-weighted error (quant/weighted.py).
    Raises ConvertError (an InferError) with a one-line message on any bad input; leaves no output then.
    """
    t0 = time.perf_counter()
    dst = Path(dst) if dst is not None else None
    if dst is None and not dry_run:
        raise ConvertError("no output file given")
    if dst is not None and not dry_run:
        _check_dst(dst, force)          # fail before the (possibly slow) planning
    plan = make_plan(src, type)
    try:
        if imatrix is not None:
            attach_imatrix(plan, imatrix)
        if not dry_run:
            write_plan(plan, dst, force=force, progress=progress)
    finally:
        plan.checkpoint.close()
    return ConvertSummary(Path(src), dst, plan.recipe.name, plan.spec.gguf_arch, len(plan.tensors),
                          plan.file_size, time.perf_counter() - t0, dry_run, plan.vocab, plan.tensors)

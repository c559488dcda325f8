"""Meta's original LLaMA checkpoint layout: ``params.json``, ``consolidated.NN.pth``, checksums.

A release directory holds ``params.json`` (shape), one ``consolidated.NN.pth`` per
model-parallel rank, ``checklist.chk`` (``md5  file`` lines) and ``tokenizer.model`` (in Meta's
downloads the tokenizer sits one level up, beside ``tokenizer_checklist.chk``).

How Meta's model-parallel code splits each weight across ranks (fairscale layers in
``llama/model.py``):

* column-parallel (output features split, dim 0): ``wq wk wv w1 w3`` and ``output``;
* row-parallel (input features split, dim 1): ``wo w2``;
* ``tok_embeddings``: ``ParallelEmbedding`` splits the embedding dim (dim 1) in LLaMA-1/2;
  LLaMA-3's ``VocabParallelEmbedding`` splits the vocabulary (dim 0) — :func:`merged_shape`
  tells the two apart by shape;
* ``attention_norm ffn_norm norm`` (and the ``rope.freqs`` buffer) are replicated.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError
from llama_pipe.core.hashing import file_digest

PARAMS = "params.json"
CHECKLIST = "checklist.chk"
TOKENIZER = "tokenizer.model"
SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")
ROW_PARALLEL = ("wo", "w2")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class MetaParams:
    """The contents of ``params.json`` (keys absent in older releases take Meta's defaults)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1 in Meta's LLaMA-1/2 releases: the tokenizer decides
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def check(self, where: str) -> None:
        """Raise InputError if the numbers cannot describe a LLaMA model."""
        for key in ("dim", "n_layers", "n_heads", "multiple_of"):
            if getattr(self, key) < 1:
                raise InputError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if self.dim % self.n_heads or self.head_dim % 2:
            raise InputError(f"{where}: dim {self.dim} must split into n_heads {self.n_heads} heads of even size")
        if self.n_heads % self.kv_heads:
            raise InputError(f"{where}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def read(cls, path: Path) -> MetaParams:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: not found; a Meta checkpoint directory needs params.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object")
        if raw.get("use_scaled_rope"):
            raise InputError(
                f"{path}: use_scaled_rope (LLaMA-3.1 rope scaling) is not supported by convert; "
                "download the Hugging Face release instead (base.source: <org>/<repo>)"
            )
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in raw]
        if missing:
            raise InputError(f"{path}: missing key(s) {missing}")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        try:
            params = cls(**known)
        except TypeError as exc:  # pragma: no cover - dataclass(**known) only fails on bad keys
            raise InputError(f"{path}: {exc}") from None
        for key in ("dim", "n_layers", "n_heads", "multiple_of", "vocab_size"):
            if not isinstance(getattr(params, key), int) or isinstance(getattr(params, key), bool):
                raise InputError(f"{path}: {key} must be an integer, got {getattr(params, key)!r}")
        params.check(str(path))
        return params


def expected_shapes(p: MetaParams, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every Meta weight name with its full (merged) shape, in checkpoint order."""
    kv_dim = p.kv_heads * p.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab_size, p.dim)}
    for i in range(p.n_layers):
        pre = f"layers.{i}."
        shapes[pre + "attention.wq.weight"] = (p.dim, p.dim)
        shapes[pre + "attention.wk.weight"] = (kv_dim, p.dim)
        shapes[pre + "attention.wv.weight"] = (kv_dim, p.dim)
        shapes[pre + "attention.wo.weight"] = (p.dim, p.dim)
        shapes[pre + "feed_forward.w1.weight"] = (p.hidden_dim, p.dim)
        shapes[pre + "feed_forward.w2.weight"] = (p.dim, p.hidden_dim)
        shapes[pre + "feed_forward.w3.weight"] = (p.hidden_dim, p.dim)
        shapes[pre + "attention_norm.weight"] = (p.dim,)
        shapes[pre + "ffn_norm.weight"] = (p.dim,)
    shapes["norm.weight"] = (p.dim,)
    shapes["output.weight"] = (vocab_size, p.dim)
    return shapes


def split_dim(name: str) -> int | None:
    """The dimension Meta splits weight ``name`` along across ranks; None if replicated."""
    parts = name.split(".")
    if name == "output.weight" or (len(parts) >= 2 and parts[-2] in COLUMN_PARALLEL):
        return 0
    if len(parts) >= 2 and parts[-2] in ROW_PARALLEL:
        return 1
    if name == "tok_embeddings.weight":
        return 1
    return None


def split_tensor(name: str, tensor: Any, n: int) -> list[Any]:
    """The ``n`` per-rank pieces of a full weight (contiguous copies, so each saves only its part)."""
    d = split_dim(name)
    if n == 1:
        return [tensor.clone()]
    if d is None:
        return [tensor.clone() for _ in range(n)]
    if tensor.shape[d] % n:
        raise ValueError(f"{name}: size {tensor.shape[d]} along dim {d} does not split into {n} shards")
    return [piece.clone() for piece in tensor.chunk(n, dim=d)]


def merged_shape(name: str, shapes: Sequence[tuple[int, ...]], dim: int) -> tuple[int, ...]:
    """The full shape of a weight whose per-rank pieces have these shapes.

    ``dim`` (the model width) tells LLaMA-1/2 embeddings (split on dim 1) from LLaMA-3 ones
    (split on the vocabulary, dim 0).
    """
    if len(shapes) == 1:
        return tuple(shapes[0])
    d = split_dim(name)
    if name == "tok_embeddings.weight" and shapes[0][1] == dim:
        d = 0
    if d is None or len(shapes[0]) <= d:
        return tuple(shapes[0])
    full = list(shapes[0])
    full[d] = sum(s[d] for s in shapes)
    return tuple(full)


def check_replicas(name: str, pieces: Sequence[Any], where: str) -> None:
    """Raise InputError unless every rank holds the same copy of a replicated weight."""
    import torch

    first = pieces[0]
    for k, other in enumerate(pieces[1:], start=1):
        if other.shape != first.shape or not torch.equal(other, first):
            raise InputError(f"{where}: replicated weight {name} differs between shard 0 and shard {k}")


# ----------------------------------------------------------------------------- shard files


def shard_paths(meta_dir: Path) -> list[Path]:
    """``consolidated.00.pth`` ... in rank order; a gap in the numbering is an InputError."""
    found: dict[int, Path] = {}
    for p in meta_dir.iterdir():
        m = SHARD_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise InputError(f"{meta_dir}: no consolidated.NN.pth shards found")
    n = max(found) + 1
    missing = [f"consolidated.{i:02d}.pth" for i in range(n) if i not in found]
    if missing:
        raise InputError(
            f"{meta_dir}: missing shard(s) {', '.join(missing)} (found {len(found)} of {n}); "
            "re-run the download, which resumes and verifies against checklist.chk"
        )
    return [found[i] for i in range(n)]


def load_shard(path: Path) -> dict[str, Any]:
    """Load one ``.pth`` as plain tensors: memory-mapped, and never running pickled code."""
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Pre-1.6 (non-zip) files cannot be memory-mapped: read them into memory instead.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: refused to load: the file is not plain tensors (it holds pickled objects that "
            f"could run code; torch.load(weights_only=True) said: {first}). Only load checkpoints "
            "from a source you trust, and re-download this one"
        ) from None
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except Exception as exc:  # zip errors, truncated files...
        raise InputError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); is it truncated?") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: expected a dict of tensors (a Meta state dict), got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------- checksums


def checklist_text(directory: Path, names: Iterable[str], algo: str = "md5") -> str:
    """``md5sum``-style lines (``<hex>  <name>``) for files of ``directory``, sorted by name."""
    return "".join(f"{file_digest(directory / n, algo)}  {n}\n" for n in sorted(names))


def parse_checksums(text: str, where: str) -> dict[str, tuple[str, str]]:
    """``{file name: (algorithm, hex)}`` from md5sum/sha256sum output (algorithm by digest length)."""
    algos = {32: "md5", 64: "sha256"}
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([0-9a-fA-F]+)\s+\*?(.+)$", line)
        if not m or len(m.group(1)) not in algos:
            raise InputError(f"{where}: line {n} is not '<md5 or sha256 hex>  <file>': {line[:80]!r}")
        name = m.group(2).strip()
        if name.startswith("./"):
            name = name[2:]
        if name.startswith("/") or ".." in Path(name).parts:
            raise InputError(f"{where}: line {n} names an unsafe path {name!r}")
        out[name] = (algos[len(m.group(1))], m.group(1).lower())
    if not out:
        raise InputError(f"{where}: no checksum lines")
    return out


def verify_checklist(directory: Path, checklist: str = CHECKLIST, digests: bool = True) -> list[str]:
    """Check every file listed in ``directory/checklist`` (md5 or sha256); return their names.

    A listed file that is missing (or, with ``digests``, whose digest differs) is an InputError
    naming it, so an absent, truncated or bit-flipped shard cannot be converted unnoticed.
    """
    path = directory / checklist
    sums = parse_checksums(path.read_text(encoding="utf-8", errors="replace"), str(path))
    missing = sorted(n for n in sums if not (directory / n).is_file())
    if missing:
        raise InputError(f"{directory}: {', '.join(missing)} listed in {checklist} but missing; re-run the download")
    if not digests:
        return sorted(sums)
    for name, (algo, want) in sorted(sums.items()):
        got = file_digest(directory / name, algo)
        if got != want:
            raise InputError(
                f"{directory / name}: {algo} {got} does not match {checklist} ({want}); the file is damaged, "
                "re-run the download"
            )
    return sorted(sums)


# ----------------------------------------------------------------------------- atomic directories


def permute_for_rotary(w: Any, n_heads: int) -> Any:
    """Reorder each head's rows from Meta's interleaved rotary pairs to Hugging Face's halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

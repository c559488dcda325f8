"""What a model is made of, and what an adapter was trained on.

A LoRA adapter is a correction to the exact weights it was trained over: applied to other
weights it corrects the wrong thing. Two adapters each trained on the base and then merged one
after the other give ``W + dA + dB``, where ``dB`` was never trained to work with ``dA`` - a model
that may answer nonsense. Training B over A's merged model instead gives ``W + dA + dB'`` with
``dB'`` learned on top of A: a sound chain. So llama-pipe records

* in a merged model's ``llama_pipe.json``: its :class:`Lineage` (the fingerprint of the root
  weights and the steps merged into them, in order) and the fingerprint of the weights written
  (``fingerprint``), which says the lineage still describes the files;
* in a trained run's ``train_config.json``: ``trained_on`` - the path, fingerprint and lineage
  of the ``--base`` it was trained over.

``merge-adapter`` compares each adapter's ``trained_on`` with the model it is about to be merged
into (:func:`check_chain`, :func:`check_combination`). A model directory without a (current)
lineage is a root of its own: its lineage is its fingerprint and no steps.

A step is an adapter (named by the sha256 of ``adapter_model.safetensors``) or an explicit
weighted combination of adapters (``merge-adapter --combine``): method, weights and adapters.
Paths are kept for messages only; identities are the digests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_pipe.core.errors import InputError
from llama_pipe.core.sidecar import read_sidecar
from llama_pipe.weights.fingerprint import short, weights_fingerprint

log = logging.getLogger(__name__)

TRAINED_ON = "trained_on"


@dataclass(frozen=True)
class Adapter:
    """One adapter file: its sha256 and the path it was read from."""

    sha256: str
    path: str

    def describe(self) -> str:
        """``results/A/train [f84ef56acf6f]`` (path and the start of its sha256)."""
        return f"{self.path} [{short(self.sha256)}]"

    def to_json(self) -> dict[str, Any]:
        return {"adapter": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class Step:
    """What one merge added: one adapter (``combine`` None), or a weighted combination."""

    adapters: tuple[Adapter, ...]
    combine: str | None = None
    weights: tuple[float, ...] = ()

    def key(self) -> tuple[Any, ...]:
        if self.combine is None:
            return (self.adapters[0].sha256,)
        return (self.combine, self.weights, tuple(a.sha256 for a in self.adapters))

    def describe(self) -> str:
        if self.combine is None:
            return self.adapters[0].describe()
        parts = ", ".join(f"{w:g} x {a.describe()}" for w, a in zip(self.weights, self.adapters, strict=True))
        return f"{self.combine}({parts})"

    def to_json(self) -> dict[str, Any]:
        if self.combine is None:
            return self.adapters[0].to_json()
        return {"combine": self.combine, "weights": list(self.weights), "adapters": [a.to_json() for a in self.adapters]}

    @staticmethod
    def from_json(data: Any) -> Step:
        if not isinstance(data, dict):
            raise ValueError("a step is an object")
        if "combine" in data:
            adapters = tuple(Adapter(str(a["sha256"]), str(a["adapter"])) for a in data["adapters"])
            weights = tuple(float(w) for w in data["weights"])
            if len(weights) != len(adapters):
                raise ValueError("one weight per adapter")
            return Step(adapters, str(data["combine"]), weights)
        return Step((Adapter(str(data["sha256"]), str(data["adapter"])),))


@dataclass(frozen=True)
class Lineage:
    """Root weights (fingerprint and path) and the steps merged into them, in order."""

    root: str
    root_path: str
    steps: tuple[Step, ...] = ()

    def key(self) -> tuple[Any, ...]:
        return (self.root, tuple(s.key() for s in self.steps))

    def then(self, step: Step) -> Lineage:
        return Lineage(self.root, self.root_path, (*self.steps, step))

    def describe(self) -> str:
        """``results/hf_base [weights 1a2b3c4d5e6f] + results/A/train [f84ef56acf6f] + ...``"""
        return " + ".join([f"{self.root_path} [weights {short(self.root)}]", *(s.describe() for s in self.steps)])

    def to_json(self) -> dict[str, Any]:
        return {"base": {"path": self.root_path, "fingerprint": self.root}, "steps": [s.to_json() for s in self.steps]}

    @staticmethod
    def from_json(data: Any) -> Lineage:
        if not isinstance(data, dict) or not isinstance(data.get("base"), dict) or not isinstance(data.get("steps"), list):
            raise ValueError("a lineage is {base: {path, fingerprint}, steps: [...]}")
        base = data["base"]
        return Lineage(str(base["fingerprint"]), str(base["path"]), tuple(Step.from_json(s) for s in data["steps"]))


@dataclass(frozen=True)
class TrainedOn:
    """What a training run recorded about its ``--base``."""

    path: str
    fingerprint: str
    lineage: Lineage

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint, "lineage": self.lineage.to_json()}


def model_lineage(model_dir: str | Path) -> tuple[str, Lineage]:
    """(fingerprint, lineage) of a model directory: the lineage its ``llama_pipe.json`` records
    when the recorded fingerprint is still that of the weights, else the directory as a root."""
    fingerprint = weights_fingerprint(model_dir)
    side = read_sidecar(model_dir)
    if "lineage" in side:
        if side.get("fingerprint") == fingerprint:
            try:
                return fingerprint, Lineage.from_json(side["lineage"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s: llama_pipe.json's lineage is unreadable (%s); taking the weights as a base of their own", model_dir, exc)
        else:
            log.warning("%s: the weights are not the ones merge-adapter wrote (fingerprint %s, recorded %s); taking them as a "
                        "base of their own", model_dir, short(fingerprint), short(str(side.get("fingerprint"))))
    return fingerprint, Lineage(fingerprint, str(model_dir))


def base_record(base_dir: str | Path) -> TrainedOn:
    """What a training run over ``base_dir`` records as ``trained_on`` in its ``train_config.json``."""
    fingerprint, lineage = model_lineage(base_dir)
    return TrainedOn(str(base_dir), fingerprint, lineage)


def trained_on(run_dir: str | Path) -> TrainedOn | None:
    """The ``trained_on`` record of a training run's directory; None when it has none (a run from
    before llama-pipe recorded it, or an adapter made by another tool) or it is unreadable."""
    path = Path(run_dir) / "train_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rec = data[TRAINED_ON]
        return TrainedOn(str(rec["path"]), str(rec["fingerprint"]), Lineage.from_json(rec["lineage"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fits(record: TrainedOn, lineage: Lineage, fingerprint: str | None) -> bool:
    """Whether an adapter trained on ``record`` belongs on the model ``lineage`` (whose weights,
    when they exist as a directory, have ``fingerprint``)."""
    return record.lineage.key() == lineage.key() or (fingerprint is not None and record.fingerprint == fingerprint)


# ----------------------------------------------------------------------------- checks before a merge

ADAPTER_FILE = "adapter_model.safetensors"
HOW_TO_COMBINE = "combine adapters trained independently on the same base explicitly (merge-adapter --combine cat --weights W1,W2; docs/serving.md)"


def _how_to_chain(start: str | Path, before: Sequence[str | Path]) -> str:
    """The commands that train the next adapter on the merged model of ``start`` + ``before``."""
    flags = " ".join(f"--adapter {a}" for a in before)
    return (f"train it on the merged model of the ones before it (llama-pipe merge-adapter --base {start} {flags} -o MERGED, "
            "then llama-pipe train --base MERGED; in the workflow: train.base_run)")


def adapter_identity(adapter: str | Path) -> Adapter:
    from llama_pipe.core.hashing import file_digest

    return Adapter(file_digest(Path(adapter) / ADAPTER_FILE), str(adapter))


def _warn_unrecorded(adapter: Path, onto: Lineage, start: str | Path, before: Sequence[str | Path]) -> None:
    if not before:
        log.warning("%s: no record of the model it was trained on (a run from before llama-pipe recorded it, or another tool's "
                    "adapter): it is merged into %s unchecked; if it was trained on other weights, the merged model is broken",
                    adapter, onto.describe())
    else:
        log.warning("%s: no record of the model it was trained on: it is merged on top of %s unchecked, which is right only if "
                    "it was trained on that merged model; an adapter trained on the base alone gives a broken model here. To "
                    "be sure, %s; or %s", adapter, onto.describe(), _how_to_chain(start, before), HOW_TO_COMBINE)


def chain_lineage(start: str | Path, adapters: Sequence[str | Path]) -> Lineage:
    """The lineage of ``start`` with ``adapters`` merged in order, after checking that adapter k
    was trained on ``start`` plus adapters 1..k-1; raises :class:`InputError` (one line: what it
    was trained on, where it would go, how to train it right) when not. An adapter without a
    record is merged with a warning."""
    fingerprint: str | None
    fingerprint, lineage = model_lineage(start)
    first = lineage
    for i, a in enumerate(map(Path, adapters)):
        rec = trained_on(a)
        if rec is None:
            _warn_unrecorded(a, lineage, start, adapters[:i])
        elif not fits(rec, lineage, fingerprint):
            if i == 0 and Path(rec.path).resolve() == Path(start).resolve():
                how = f"train it again on {start}: that model changed since this adapter was trained on it"
            elif i == 0:
                how = f"merge it into the model it was trained on (--base {rec.path}), or train it on {start}"
            elif rec.lineage.key() == first.key():  # trained on the base alone, like seed 002's second adapter
                how = f"{_how_to_chain(start, adapters[:i])}; or {HOW_TO_COMBINE}"
            else:
                how = f"{_how_to_chain(start, adapters[:i])}; or merge it into the model it was trained on (--base {rec.path})"
            raise InputError(f"{a} was trained on {rec.lineage.describe()}, not on {lineage.describe()}, which it would be merged "
                             f"into here: an adapter only fits the weights it was trained on. To chain it, {how}")
        lineage = lineage.then(Step((adapter_identity(a),)))
        fingerprint = None  # the weights after a merge exist only in memory
    return lineage


def combination_lineage(start: str | Path, adapters: Sequence[str | Path], method: str, weights: Sequence[float]) -> Lineage:
    """The lineage of ``start`` plus one weighted combination of ``adapters``, after checking that
    every one was trained on ``start`` (a combination adds updates computed against the same
    weights); raises :class:`InputError` when one was not."""
    fingerprint, lineage = model_lineage(start)
    for a in map(Path, adapters):
        rec = trained_on(a)
        if rec is None:
            _warn_unrecorded(a, lineage, start, ())
        elif not fits(rec, lineage, fingerprint):
            raise InputError(f"{a} was trained on {rec.lineage.describe()}, not on {lineage.describe()}: a combination adds "
                             f"adapters trained on the same base (--base {start}); give --base {rec.path}, or leave this adapter out")
    step = Step(tuple(adapter_identity(a) for a in adapters), method, tuple(float(w) for w in weights))
    return lineage.then(step)

"""kill -9 anywhere: every stage is SIGKILLed mid-run under Snakemake, and a re-run with
``--rerun-incomplete`` ends with outputs byte-identical to an uninterrupted run.

A small workspace holds a Snakefile whose rules call the real ``llama-pipe`` stages with the
contract command lines (make-base -> convert; merge -> shard -> clean / filter-lang / split per
shard -> gather; merge-adapter over the converted base). The whole process group (Snakemake and
its job) is killed, so Snakemake itself never gets to clean up: on the next run it must find the
job's output missing or marked incomplete.

An uninterrupted reference run (in the background), and a second workspace where, for each stage
in DAG order, Snakemake is started on that stage's targets (re-running whatever the previous kill
left incomplete), the stage's temporary output is awaited (the stage is writing), a seeded random
0-40 ms pass, and the process group gets SIGKILL, then ``snakemake --unlock``. A final run
completes the DAG and every output file is compared byte for byte with the reference. Seed:
``RELIABILITY_SEED`` (default 0). Training's own kill/resume equality (adapter equal within 1e-6)
is proven by the trainer's tests; see docs/guarantees.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLE
from tests.reliability import harness as h

BIN = Path(sys.executable).parent
SHARDS = ("000", "001")

SNAKEFILE = r'''
SHARDS = ["000", "001"]

rule all:
    input: "results/data/train.jsonl", "results/data/val.jsonl", "results/merged"

rule make_base:
    input: "data/corpus.json"
    output: directory("results/base")
    log: "logs/make-base.log"
    shell: "llama-pipe make-base {output:q} --tokenizer-corpus {input:q} > {log:q} 2>&1"

rule convert:
    input: "results/base"
    output: directory("results/hf_base")
    log: "logs/convert.log"
    shell: "llama-pipe convert {input:q} -o {output:q} > {log:q} 2>&1"

rule merge:
    input: "data/a.json", "data/b.json"
    output: data="results/merge/merged.jsonl", stats="results/merge/merged.stats.json", rejects="results/merge/merged.rejects.jsonl"
    log: "logs/merge.log"
    shell: "llama-pipe merge {input:q} -o {output.data:q} > {log:q} 2>&1"

rule shard:
    input: "results/merge/merged.jsonl"
    output: directory("results/shard")
    log: "logs/shard.log"
    shell: "llama-pipe shard {input:q} --n 2 -o {output:q} > {log:q} 2>&1"

rule clean:
    input: "results/shard"
    output: data="results/clean/shard-{s}.jsonl", stats="results/clean/shard-{s}.stats.json", rejects="results/clean/shard-{s}.rejects.jsonl"
    log: "logs/clean-{s}.log"
    shell: "llama-pipe clean {input:q}/shard-{wildcards.s}.jsonl -o {output.data:q} --workers 1 > {log:q} 2>&1"

rule filter_lang:
    input: "results/clean/shard-{s}.jsonl"
    output: data="results/filter-lang/shard-{s}.jsonl", stats="results/filter-lang/shard-{s}.stats.json", rejects="results/filter-lang/shard-{s}.rejects.jsonl"
    log: "logs/filter-lang-{s}.log"
    shell: "llama-pipe filter-lang {input:q} -o {output.data:q} > {log:q} 2>&1"

rule split:
    input: data="results/filter-lang/shard-{s}.jsonl", tok="results/hf_base"
    output: data="results/split/shard-{s}.jsonl", stats="results/split/shard-{s}.stats.json", rejects="results/split/shard-{s}.rejects.jsonl"
    log: "logs/split-{s}.log"
    shell: "llama-pipe split {input.data:q} -o {output.data:q} --tokenizer {input.tok:q} --max-length 256 > {log:q} 2>&1"

rule gather:
    input: expand("results/split/shard-{s}.jsonl", s=SHARDS)
    output: train="results/data/train.jsonl", val="results/data/val.jsonl"
    log: "logs/gather.log"
    shell: "llama-pipe gather {input:q} --train {output.train:q} --val {output.val:q} > {log:q} 2>&1"

rule merge_adapter:
    input: base="results/hf_base", adapter="data/adapter"
    output: directory("results/merged")
    log: "logs/merge-adapter.log"
    shell: "llama-pipe merge-adapter --base {input.base:q} --adapter {input.adapter:q} -o {output:q} > {log:q} 2>&1"
'''

# stage -> (Snakemake targets that make it run, where its temporary outputs appear as (dir, glob))
STAGES: dict[str, tuple[list[str], list[tuple[str, str]]]] = {
    "make-base": (["results/base"], [("results", "base.tmp-*")]),
    "convert": (["results/hf_base"], [("results", "hf_base.tmp-*")]),
    "merge": (["results/merge/merged.jsonl"], [("results/merge", ".merged*.tmp")]),
    "shard": (["results/shard"], [("results", "shard.tmp-*")]),
    "clean": ([f"results/clean/shard-{s}.jsonl" for s in SHARDS], [("results/clean", ".shard-*.tmp")]),
    "filter-lang": ([f"results/filter-lang/shard-{s}.jsonl" for s in SHARDS], [("results/filter-lang", ".shard-*.tmp")]),
    "split": ([f"results/split/shard-{s}.jsonl" for s in SHARDS], [("results/split", ".shard-*.tmp")]),
    "gather": (["results/data/train.jsonl"], [("results/data", ".*.tmp")]),
    "merge-adapter": (["results/merged"], [("results", "merged.tmp-*")]),
}


def make_adapter(model_dir: Path, out: Path, base_name: str | None = None) -> Path:
    """Save a LoRA adapter (q_proj, v_proj, r=4, non-zero B, seeded) for ``model_dir``'s shapes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    if base_name is not None:
        cfg = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = base_name
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf_model_dir: Path) -> Path:
    """An adapter that fits the workspace's converted base (same shapes as the tiny fixture
    model). It names ``results/hf_base`` as its base: peft probes the recorded base's vocabulary,
    and the fixture model's differs from the converted one."""
    return make_adapter(tiny_hf_model_dir, tmp_path_factory.mktemp("adapter") / "adapter", "results/hf_base")


def _workspace(root: Path, adapter: Path, shared_data: Path) -> Path:
    ws = root
    (ws / "data").mkdir(parents=True)
    (ws / "Snakefile").write_text(SNAKEFILE, encoding="utf-8")
    shutil.copy(SAMPLE, ws / "data" / "corpus.json")
    shutil.copy(SAMPLE, ws / "data" / "a.json")
    cn = json.loads((shared_data / "gitcloner_dummy_cn.json").read_text(encoding="utf-8"))[:150]
    (ws / "data" / "b.json").write_text(json.dumps(cn, ensure_ascii=False), encoding="utf-8")
    shutil.copytree(adapter, ws / "data" / "adapter")
    return ws


def _env() -> dict[str, str]:
    return h.set_env(PATH=f"{BIN}:{os.environ['PATH']}", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _snakemake(ws: Path, *targets: str) -> subprocess.Popen[bytes]:
    log = open(ws / "snakemake.out", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [str(BIN / "snakemake"), *targets, "--cores", "2", "--rerun-incomplete", "--nocolor"],
        cwd=ws, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _temps(ws: Path, where: list[tuple[str, str]]) -> set[str]:
    import fnmatch

    found = set()
    for d, pattern in where:
        try:
            with os.scandir(ws / d) as it:
                found |= {f"{d}/{e.name}" for e in it if fnmatch.fnmatch(e.name, pattern)}
        except FileNotFoundError:
            pass
    return found


def _failure(ws: Path) -> str:
    """The end of Snakemake's output and of every job log that reports an error."""
    parts = [(ws / "snakemake.out").read_text(errors="replace")[-1500:]]
    for log in sorted((ws / "logs").glob("*.log")):
        text = log.read_text(errors="replace")
        if "error" in text.lower():
            parts.append(f"--- {log.name}:\n{text[-1500:]}")
    return "\n".join(parts)


def _kill_during(ws: Path, stage: str, rng: random.Random) -> tuple[str, dict[str, bytes]]:
    """Run Snakemake up to ``stage`` (re-running whatever an earlier kill left incomplete) and
    SIGKILL its process group a seeded random moment (0-40 ms) after ``stage`` starts writing.
    Returns where the kill landed and the stage's outputs as they were right after it."""
    targets, where = STAGES[stage]
    before = _temps(ws, where)
    proc = _snakemake(ws, *targets)
    deadline = time.monotonic() + 120
    landed = "missed"
    while proc.poll() is None and time.monotonic() < deadline:
        if _temps(ws, where) - before:
            time.sleep(rng.uniform(0, 0.04))
            landed = "mid-write" if _temps(ws, where) - before else "after-write"
            break
        time.sleep(0.0005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = {}
    for t in targets:
        path = ws / t
        for f in ([path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []):
            if f.is_file():
                left[str(f.relative_to(ws))] = f.read_bytes()
    subprocess.run([str(BIN / "snakemake"), "--unlock", "--cores", "1"], cwd=ws, env=_env(), capture_output=True, check=True)
    return landed, left


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / "results").rglob("*"))
        if p.is_file() and ".tmp" not in str(p.relative_to(root))
    }


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory, adapter_dir: Path, shared_data: Path) -> dict[str, object]:
    """The uninterrupted reference run (in the background) and the kill-every-stage run."""
    h.require_stage(*STAGES)
    seed = int(os.environ.get("RELIABILITY_SEED", "0"))
    rng = random.Random(seed)
    root = tmp_path_factory.mktemp("interrupt")
    ref = _workspace(root / "reference", adapter_dir, shared_data)
    reference = _snakemake(ref)
    ws = _workspace(root / "killed", adapter_dir, shared_data)
    landed, at_kill = {}, {}
    for stage in STAGES:
        landed[stage], at_kill[stage] = _kill_during(ws, stage, rng)
    final = _snakemake(ws)
    assert final.wait(timeout=300) == 0, _failure(ws)
    assert reference.wait(timeout=300) == 0, _failure(ref)
    return KilledRun({
        "seed": seed, "landed": landed, "at_kill": at_kill, "expected": _tree(ref), "got": _tree(ws),
        "leftovers": sorted(str(p.relative_to(ws)) for p in (ws / "results").rglob("*") if ".tmp" in p.name),
    })


class KilledRun(dict):  # type: ignore[type-arg]
    """The kill run's results; a short repr keeps failure reports readable (no file bytes)."""

    def __repr__(self) -> str:
        return f"KilledRun(seed={self['seed']}, landed={self['landed']}, files={len(self['expected'])})"


def _stage_files(stage: str, names: list[str]) -> list[str]:
    """The files among ``names`` that ``stage`` writes: under a directory target, or beside a
    file target with the same stem (``shard-000.jsonl`` -> ``shard-000.stats.json`` ...)."""
    out = []
    for t in STAGES[stage][0]:
        stem = Path(t).name.split(".")[0] + "."
        for name in names:
            if name.startswith(t + "/") or (Path(name).parent == Path(t).parent and Path(name).name.startswith(stem)):
                out.append(name)
    if stage == "gather":
        out += [n for n in names if n.startswith("results/data/")]
    return sorted(set(out))


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_files(killed_run: dict[str, object]) -> None:
    """After the kills and the final run, the set of output files is the uninterrupted run's."""
    expected, got = killed_run["expected"], killed_run["got"]
    assert isinstance(expected, dict) and isinstance(got, dict)
    assert "results/data/train.jsonl" in expected and "results/merged/config.json" in expected, sorted(expected)
    assert sorted(got) == sorted(expected), f"files differ: {sorted(set(got) ^ set(expected))}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_then_rerun_is_byte_identical(stage: str, killed_run: dict[str, object]) -> None:
    """The stage was SIGKILLed (with its Snakemake) while writing, re-run by Snakemake, and every
    file it writes is byte-identical to the uninterrupted run's."""
    expected, got = killed_run["expected"], killed_run["got"]
    assert isinstance(expected, dict) and isinstance(got, dict)
    files = _stage_files(stage, sorted(expected))
    assert files, f"no output files of {stage} in the reference run"
    report = json.dumps({"seed": killed_run["seed"], "landed": killed_run["landed"]}, indent=1)
    differing = [name for name in files if got.get(name) != expected[name]]
    assert not differing, f"{report}\nnot byte-identical after kill + rerun: {differing}"


@pytest.mark.slow
def test_stats_invariant_in_every_stats_file_of_the_dag(killed_run: dict[str, object]) -> None:
    """Every ``*.stats.json`` the DAG wrote (uninterrupted and killed-and-re-run alike) says
    ``in == out + sum(rejected)``, and each data stage reads what the one before kept."""
    for tree in (killed_run["expected"], killed_run["got"]):
        assert isinstance(tree, dict)
        stats = {name: json.loads(data) for name, data in tree.items() if name.endswith(".stats.json")}
        assert len(stats) >= 1 + 1 + 3 * len(SHARDS) + 1, sorted(stats)  # merge, shard, 3 x shards, gather
        for name, st in stats.items():
            assert st["in"] == st["out"] + sum(st["rejected"].values()), (name, st)
        assert stats["results/shard/shard.stats.json"]["in"] == stats["results/merge/merged.stats.json"]["out"]
        for s in SHARDS:
            clean = stats[f"results/clean/shard-{s}.stats.json"]
            lang = stats[f"results/filter-lang/shard-{s}.stats.json"]
            assert lang["in"] == clean["out"], (clean, lang)


@pytest.mark.slow
def test_kills_landed_while_stages_were_writing(killed_run: dict[str, object]) -> None:
    """The test is only as good as its kills: most must hit a stage while its temporary output
    existed (not during start-up or after the rename)."""
    landed = killed_run["landed"]
    assert isinstance(landed, dict)
    assert sum(v == "mid-write" for v in landed.values()) >= len(STAGES) // 2, landed


@pytest.mark.slow
def test_sigkilled_stage_leaves_no_partial_output(killed_run: dict[str, object]) -> None:
    """Right after each kill, every output file of the killed stage is either absent or
    complete (byte-identical to the reference): outputs appear by atomic rename only."""
    expected, at_kill = killed_run["expected"], killed_run["at_kill"]
    assert isinstance(expected, dict) and isinstance(at_kill, dict)
    partial = [f"{stage}: {name}" for stage, files in at_kill.items() for name, data in files.items()
               if ".tmp" not in name and expected.get(name) != data]
    assert not partial, f"partial outputs visible after SIGKILL: {partial}"


@pytest.mark.slow
def test_no_temporary_files_survive_kill_and_rerun(killed_run: dict[str, object]) -> None:
    """After kills mid-write and a completed re-run, no ``*.tmp*`` remains (a killed 13 GB
    convert must not leave 13 GB behind for good)."""
    assert not killed_run["leftovers"], f"temporary files left after kill + successful re-run: {killed_run['leftovers']}"


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_next_writer_removes_temporaries_of_a_killed_writer(kind: str, tmp_path: Path) -> None:
    """The shared writers (atomic.AtomicFile, atomic.new_temp_dir): a writer SIGKILLed while
    writing leaves its temporary; the next writer of the same output removes it, and leaves alone
    the temporary of a writer that is still running. The killed writer is killed the way the
    Snakemake tests kill it (its whole process group, its parent shell too), so it lingers as an
    orphaned zombie until init reaps it: that counts as dead."""
    out = tmp_path / ("out.jsonl" if kind == "file" else "hf_base")
    make = (f"f = AtomicFile({str(out)!r}); f.fh.write('partial'); f.fh.flush(); print(f.tmp, flush=True)"
            if kind == "file" else f"t = new_temp_dir({str(out)!r}); (t / 'w').write_text('partial'); print(t, flush=True)")
    code = f"from llama_pipe.core.atomic import AtomicFile, new_temp_dir\n{make}\nimport time; time.sleep(120)"
    script = tmp_path / "writer.py"
    script.write_text(code, encoding="utf-8")
    # sh -> python: killing the group kills the shell too, so python is orphaned, not reaped by us.
    killed = subprocess.Popen(["sh", "-c", f"{sys.executable} {script}; true"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    alive = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        killed_tmp, alive_tmp = Path(killed.stdout.readline().strip()), Path(alive.stdout.readline().strip())  # type: ignore[union-attr]
        assert killed_tmp.exists() and alive_tmp.exists()
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        time.sleep(0.05)
        from llama_pipe.core.atomic import AtomicFile, new_temp_dir

        if kind == "file":
            f = AtomicFile(out)
            f.fh.write("complete\n")
            f.commit()
        else:
            new_temp_dir(out).rename(out)
        assert not killed_tmp.exists(), "the killed writer's temporary survived the next write"
        assert alive_tmp.exists(), "a running writer's temporary was removed"
    finally:
        for proc in (killed, alive):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("failure", [None, KeyboardInterrupt, OSError])
def test_atomic_dir_is_all_or_nothing(failure: type[BaseException] | None, tmp_path: Path) -> None:
    """``atomic_dir``, which every directory-writing stage uses: on success the new directory
    replaces the old one whole; on any exception in the body (an interrupt included) the older
    directory stays as it was and no temporary is left beside it."""
    from llama_pipe.core.atomic import MARKER, atomic_dir

    out = tmp_path / "out"
    with atomic_dir(out) as first:  # the older output, written the same way (a foreign directory is never replaced)
        (first / "old.txt").write_text("old", encoding="utf-8")
    try:
        with atomic_dir(out) as tmp:
            assert tmp.parent == out.parent and tmp != out
            (tmp / "new.txt").write_text("new", encoding="utf-8")
            if failure is not None:
                raise failure("stop")
    except (KeyboardInterrupt, OSError):
        assert failure is not None
    expected = ["new.txt"] if failure is None else ["old.txt"]
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a temporary was left behind"

"""The DAG as a user sees it in a dry-run: stages, scatter width, branches, resources, profiles."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from workflow_helpers import REPO, job_counts, snakemake

from llama_pipe.stages import DATA_STAGES


def data_jobs(shards: int) -> dict[str, int]:
    """Jobs of the data rules: one per shard for a per-shard stage, else one."""
    return {s.rule: shards if s.per_shard else 1 for s in DATA_STAGES}


WHOLE_DAG = {
    "make_base": 1,
    "convert": 1,
    **data_jobs(2),
    "distill": 1,
    "train": 1,
    "select": 1,
    "merge_adapter": 1,
    "benchmark": 1,  # eval.retention_items: arc_easy-test
    "eval": 1,
    "report": 1,
    "all": 1,
}


def dry_run(workdir: Path, *args: str) -> str:
    return snakemake(workdir, "-n", "--profile", "profiles/default", *args).stdout


def job_blocks(output: str) -> dict[str, list[str]]:
    """rule -> the dry-run's job descriptions of that rule (one text block per job)."""
    blocks: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        match = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if match:
            blocks.setdefault(match.group(1), []).append(block)
    return blocks


def resources(block: str) -> dict[str, str]:
    line = re.search(r"^\s+resources: (.*)$", block, re.M)
    assert line, block
    return dict(item.split("=", 1) for item in line.group(1).split(", "))


def test_default_target_is_the_report_through_every_stage(fresh_workflow: Path) -> None:
    out = dry_run(fresh_workflow)
    assert job_counts(out) == WHOLE_DAG
    assert "output: results/default/report" in out


def test_distill_sits_between_gather_and_train_unless_off(fresh_workflow: Path) -> None:
    blocks = job_blocks(dry_run(fresh_workflow, "-p"))
    (distill,) = blocks["distill"]
    gathered = re.search(r"input: results/hf_base, (results/data/gather/\w+/train.jsonl)", distill)
    distilled = re.search(r"output: (results/data/distill/\w+/train.jsonl)", distill)
    assert gathered and distilled, distill
    assert f"--train-data={distilled.group(1)}" in blocks["train"][0]
    # keyed by its settings: another distill setting, another directory (the first one is kept)
    other = job_blocks(dry_run(fresh_workflow, "-p", "--config", 'distill={"max_rewrites": 8}'))["distill"][0]
    assert distilled.group(1) not in other and gathered.group(1) in other
    off = job_blocks(dry_run(fresh_workflow, "-p", "--config", 'distill={"mode": "off"}'))
    assert "distill" not in off
    assert f"--train-data={gathered.group(1)}" in off["train"][0]


def test_data_stages_scatter_over_data_shards(fresh_workflow: Path) -> None:
    out = dry_run(fresh_workflow, "--config", 'data={"shards": 5}', "--", "data")
    counts = job_counts(out)
    assert counts == {"make_base": 1, "convert": 1, **data_jobs(5), "data": 1}
    assert re.search(r"results/data/shard/\w+/shard-004\.jsonl", out) and "shard-005" not in out


def test_a_hub_or_url_source_downloads_instead_of_building_the_tiny_model(fresh_workflow: Path) -> None:
    out = dry_run(fresh_workflow, "--config", 'base={"source": "meta-llama/Llama-2-7b-hf"}', "--", "results/hf_base")
    assert job_counts(out) == {"download": 1, "convert": 1}


def test_cuda_devices_ask_the_scheduler_for_gpus(fresh_workflow: Path) -> None:
    cpu = job_blocks(dry_run(fresh_workflow))
    assert {rule: resources(cpu[rule][0]).get("gpu") for rule in ("train", "merge_adapter", "eval")} == {
        "train": "0", "merge_adapter": "0", "eval": "0"}
    cuda = job_blocks(dry_run(fresh_workflow, "--config", 'train={"device": "cuda"}', 'eval={"device": "cuda"}'))
    assert {rule: resources(cuda[rule][0]).get("gpu") for rule in ("train", "merge_adapter", "eval")} == {
        "train": "1", "merge_adapter": "1", "eval": "1"}
    assert "gpu" not in resources(cuda["clean"][0])


def test_launch_processes_runs_train_under_accelerate_launch(fresh_workflow: Path) -> None:
    one = job_blocks(dry_run(fresh_workflow, "-p"))["train"][0]
    assert "llama-pipe train --base" in one and "accelerate" not in one
    out = dry_run(fresh_workflow, "-p", "--resources", "gpu=4", "--config", 'train={"device": "cuda"}',
                  'launch={"processes": 4, "accelerate_config": "configs/accelerate/fsdp.yaml"}')
    block = job_blocks(out)["train"][0]
    assert resources(block)["gpu"] == "4"
    accel = "configs/accelerate/fsdp.yaml"  # relative to the working directory, where it is
    assert accel in block  # an input: editing the file re-runs training
    assert (f"accelerate launch --config_file {accel} --num_processes 4 --main_process_port 29500 "
            "--module llama_pipe train --base=results/hf_base") in out
    missing = snakemake(fresh_workflow, "-n", "--config", 'launch={"processes": 2, "accelerate_config": "nope.yaml"}',
                        check=False)
    assert missing.returncode != 0 and "nope.yaml" in missing.stdout + missing.stderr


def test_slurm_profile_sends_gpu_rules_to_the_gpu_partition(fresh_workflow: Path) -> None:
    out = snakemake(fresh_workflow, "-n", "--profile", "profiles/slurm").stdout
    blocks = job_blocks(out)
    train = resources(blocks["train"][0])
    assert train["slurm_partition"] == "gpu" and train["gpu"] == "1"
    assert int(train["mem_mb"]) > int(resources(blocks["clean"][0])["mem_mb"])
    assert resources(blocks["clean"][0])["slurm_partition"] == "cpu"


def test_invalid_config_fails_at_load_naming_the_key(fresh_workflow: Path) -> None:
    proc = snakemake(fresh_workflow, "-n", "--config", 'train={"lora": {"r": 0}}', check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "train.lora.r: 0 is less than the minimum of 1" in message, message


def test_numbers_given_with_config_on_the_command_line_are_numbers(fresh_workflow: Path) -> None:
    # snakemake parses nested --config values as strings ("16"); the workflow reads them by schema.
    out = dry_run(fresh_workflow, "-p", "--config", 'train={"lora": {"r": 16}, "packing": false}', "--", "results/default/train")
    assert "--lora.r 16 " in out and "--packing false " in out


def test_unknown_config_key_fails_at_load_naming_the_closest_key(fresh_workflow: Path) -> None:
    proc = snakemake(fresh_workflow, "-n", "--config", 'clean={"blocked_wrods": ["x"]}', check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "clean.blocked_wrods: unknown key; did you mean 'blocked_words'?" in message, message
    assert "properties" not in message and len(message.splitlines()) < 12, message  # no schema dump


def test_cross_field_config_error_fails_at_load(fresh_workflow: Path) -> None:
    # passes the schema (each value is valid), but train would refuse it inside its (GPU) job
    proc = snakemake(fresh_workflow, "-n", "--config",
                     'train={"optimizer_in_backward": true, "grad_accum": 2, "max_grad_norm": 0}', check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "train.optimizer_in_backward needs grad_accum: 1 (it is 2)" in message, message
    assert "rule train" not in message  # nothing was planned
    ok = dry_run(fresh_workflow, "--config", 'train={"optimizer_in_backward": true, "max_grad_norm": 0}')
    assert job_counts(ok)["train"] == 1


def test_chunks_follow_the_training_row_length(fresh_workflow: Path) -> None:
    """split.max_length null (the default) follows chat.max_seq_len: raising the training length
    makes split measure longer chunks (it used to stay at 512, training on short chunks); an
    explicit split.max_length above chat.max_seq_len fails at load, naming both keys."""
    for length in (512, 2048):
        blocks = job_blocks(dry_run(fresh_workflow, "-p", "--config", f'chat={{"max_seq_len": {length}}}'))
        split_jobs = blocks["split"]
        assert split_jobs and all("--max_length null " in b and f"--max_seq_len {length} " in b for b in split_jobs), split_jobs[0]
        assert all(f"--max_seq_len {length} " in b for b in blocks["train"])
    shorter = job_blocks(dry_run(fresh_workflow, "-p", "--config", 'split={"max_length": 256}'))["split"]
    assert all("--max_length 256 " in block for block in shorter)
    proc = snakemake(fresh_workflow, "-n", "--config", 'split={"max_length": 1024}', check=False)
    message = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "split.max_length (1024) is over chat.max_seq_len (512)" in message, message


def test_rule_all_asks_for_every_key_product(fresh_workflow: Path) -> None:
    out = dry_run(fresh_workflow, "--config", 'train={"run": "r16"}')
    block = job_blocks(out)["all"][0]
    for product in ("results/hf_base", "results/r16/train", "results/r16/merged", "results/r16/eval", "results/r16/report"):
        assert product in block, block
    for data in ("train", "val"):  # the data of these settings: results/data/gather/<key>/
        assert re.search(rf"results/data/gather/[0-9a-f]{{10}}/{data}\.jsonl", block), block


def test_gguf_exports_belong_to_their_run(fresh_workflow: Path) -> None:
    """export.all_types adds the run's GGUF files to the default target, under results/<run>/export,
    so a sweep's runs keep their own exports; one file can also be asked for by name."""
    out = dry_run(fresh_workflow, "--config", 'train={"run": "r16"}', 'export={"all_types": ["f16", "q8_0"]}')
    exports = job_blocks(out)["export_gguf"]
    assert sorted(re.search(r"output: (\S+)", block).group(1) for block in exports) == [
        "results/r16/export/model.f16.gguf", "results/r16/export/model.q8_0.gguf"]
    one = job_blocks(dry_run(fresh_workflow, "--", "results/default/export/model.q8_0.gguf"))
    assert len(one["export_gguf"]) == 1 and "results/default/merged" in one["export_gguf"][0]


def test_run_name_must_not_escape_results(fresh_workflow: Path) -> None:
    for run in ("../x", "data"):
        proc = snakemake(fresh_workflow, "-n", "--config", f'train={{"run": "{run}"}}', check=False)
        assert proc.returncode != 0 and "train.run" in proc.stdout + proc.stderr


def test_threads_follow_the_workers_settings(fresh_workflow: Path) -> None:
    blocks = job_blocks(dry_run(fresh_workflow, "--cores", "8", "--config", 'filter_lang={"workers": 3}'))
    assert re.search(r"^\s+threads: 3$", blocks["filter_lang"][0], re.M), blocks["filter_lang"][0]
    assert re.search(r"^\s+threads: 2$", blocks["clean"][0], re.M)  # workers 0: 2 per shard job


def test_slurm_profile_gives_train_its_cpus_as_threads(fresh_workflow: Path) -> None:
    profile = yaml.safe_load((fresh_workflow / "profiles/slurm/config.yaml").read_text())
    assert profile["set-threads"]["train"] == 8
    assert all("cpus_per_task" not in res for res in profile["set-resources"].values())
    assert profile["show-failed-logs"] is True
    # retries on train only (it resumes from its newest checkpoint): a rule directive, not the profile's
    assert "retries" not in profile
    rules = "".join(p.read_text() for p in (fresh_workflow / "workflow/rules").glob("*.smk"))
    assert re.findall(r"^\s+retries: (\d+)$", rules, re.M) == ["1"]
    assert re.search(r"rule train:(?:(?!\nrule ).)*\n    retries: 1\n", rules, re.S)


def test_lint_is_clean(fresh_workflow: Path) -> None:
    proc = snakemake(fresh_workflow, "--lint")
    assert "Lints for" not in proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_rule_files_are_snakefmt_formatted() -> None:
    import subprocess

    snakefmt = Path(sys.executable).with_name("snakefmt")
    if not snakefmt.exists():
        pytest.skip("snakefmt is not installed (pip install -e '.[test]')")
    proc = subprocess.run([str(snakefmt), "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Against a real Slurm: a 2-node job of the demo classification config, submitted with sbatch.

Needs the local cluster (``scripts/slurm/local_cluster.sh start``; ``make test-slurm`` starts and
stops it) and skips, saying why, when Slurm is not installed or not running. Checks that both
ranks ran under Lightning's SLURMEnvironment (world size 2, nodes n1 and n2), that
``scancel --signal=USR1`` makes the job checkpoint at a step boundary, requeue itself and resume
to the expected global step with no step lost or repeated, and that the job's validation metrics
(computed on 2 ranks) equal a single-process validation of its final checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from ravlt_pl.cli import main
from ravlt_pl.data.synthetic import make_classification
from tests.conftest import TINY

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("RAVLT_SLURM_DIR", "/tmp/ravlt-slurm"))
TOOLS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun", "slurmctld", "slurmd", "munged")
TINY_ARGS = {k: v for k, v in TINY.items() if k not in ("layerscales", "layer_init_values")}
PAUSE_AT = 3  # the global step at which the first run waits for the test's signal
STEPS = 10  # 20 training images, 2 per device × 2 ranks = global batch 4 → 5 steps/epoch, 2 epochs


class PauseAtStep(Callback):
    """Test hook: in the job's first run (not after a requeue), wait at the start of global step
    ``step`` until ``<gate>/release`` exists, having written ``<gate>/paused-rank<R>``. Makes the
    moment of the signal deterministic; the requeue itself is all Slurm and Lightning."""

    def __init__(self, step: int, gate: str) -> None:
        self.step, self.gate, self.done = step, Path(gate), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done or trainer.global_step != self.step or os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            return
        self.done = True
        (self.gate / f"paused-rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + 300
        while not (self.gate / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    missing = [tool for tool in TOOLS if shutil.which(tool, path=path) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): apt-get install -y --no-install-recommends "
                    "slurmctld slurmd slurm-client munge")  # fmt: skip
    conf = STATE / "slurm.conf"
    if not (STATE / "pids").is_file():
        pytest.skip(f"no local Slurm running in {STATE}: scripts/slurm/local_cluster.sh start (make test-slurm does it)")
    env = {**os.environ, "PATH": path, "SLURM_CONF": str(conf)}
    info = subprocess.run(["sinfo", "-h", "-o", "%D %t"], env=env, capture_output=True, text=True, timeout=30)
    if info.returncode or info.stdout.split() != ["2", "idle"]:
        pytest.skip(f"local Slurm in {STATE} is not answering with 2 idle nodes: {info.stdout or info.stderr}")
    return env


def scontrol_job(job: str, env) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def wait_for(condition, what: str, job: str, env, log: Path, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        state = scontrol_job(job, env).get("JobState", "?")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            value = condition()  # it may have become true in between
            if value:
                return value
            break
        time.sleep(0.5)
    output = log.read_text()[-4000:] if log.exists() else "(no output file)"
    pytest.fail(f"waiting for {what}: job {job} is {scontrol_job(job, env).get('JobState')}; output:\n{output}")


def submit(env, data: Path, run: Path, log: Path, *extra: str, gate: Path | None = None) -> str:
    """sbatch the template for a 2-node (1 CPU task each) fit of the tiny demo config; the job id."""
    job_env = f"ALL,MASTER_ADDR=127.0.0.1,PYTHON={sys.executable},RUN_DIR={run}"  # n1/n2 are no host names here
    pause = ["--trainer.callbacks+=tests.test_slurm.PauseAtStep", f"--trainer.callbacks.step={PAUSE_AT}",
             f"--trainer.callbacks.gate={gate}"] if gate else []  # fmt: skip
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=15", "--job-name=ravlt-test", f"--output={log}", f"--chdir={REPO}", f"--export={job_env}",
         "scripts/slurm/train.sbatch", "demo/cls.yaml", *tiny_overrides(data),
         "--trainer.callbacks+=ravlt_pl.callbacks.RunInfo", *pause, *extra],
        env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def tiny_overrides(data: Path) -> list[str]:
    return [
        "--model.init_args.backbone_overrides", json.dumps(TINY_ARGS), "--data.init_args.root", str(data),
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.image_size", "32",
        "--model.init_args.image_size", "32", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def signal_when_paused(env, job: str, gate: Path, log: Path, scancel: list[str], message: str) -> None:
    """Both ranks waiting at step PAUSE_AT → ``scancel ...`` → both noted it → let them go on."""
    try:
        wait_for(lambda: len(list(gate.glob("paused-rank*"))) == 2, f"both ranks at step {PAUSE_AT}", job, env, log)
        subprocess.run(["scancel", *scancel, job], env=env, check=True, timeout=30)
        wait_for(lambda: log.read_text().count(message) == 2, f"'{message}' from both ranks", job, env, log)
    finally:
        (gate / "release").touch()


def run_records(run: Path, job: str) -> dict[str, dict]:
    return {p.stem.split(f"job{job}-")[1]: json.loads(p.read_text()) for p in (run / "run_info").glob(f"fit-job{job}-*.json")}


def check_two_ranks_under_slurm(records: dict[str, dict], job: str, restarts=(0,)) -> None:
    assert set(records) >= {f"restart{r}-rank{k}" for r in restarts for k in (0, 1)}, sorted(records)
    for restart in restarts:
        ranks = [records[f"restart{restart}-rank{k}"] for k in (0, 1)]
        assert {r["cluster_environment"] for r in ranks} == {"SLURMEnvironment"}  # Lightning's own detection
        assert [r["world_size"] for r in ranks] == [2, 2] and {r["slurm_node"] for r in ranks} == {"n1", "n2"}
        assert {r["strategy"] for r in ranks} == {"DDPStrategy"} and {r["slurm_job_id"] for r in ranks} == {job}


def check_finished_exactly(log_dir: Path) -> Path:
    """The run's last.ckpt is at STEPS steps, scheduler and every Adam state alike: none lost or repeated."""
    final = log_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(final, weights_only=False)
    assert checkpoint["global_step"] == STEPS and checkpoint["lr_schedulers"][0]["last_epoch"] == STEPS
    assert {float(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()} == {float(STEPS)}
    return final


def test_two_node_job_requeues_on_usr1_and_matches_one_process(slurm_env, tmp_path):
    data = make_classification(tmp_path / "shapes", train_per_class=4, val_per_class=3, image_size=32)  # 15 val: odd
    run, gate, log = tmp_path / "run", tmp_path / "gate", tmp_path / "job.out"
    gate.mkdir()
    job = submit(slurm_env, data, run, log, gate=gate)
    try:
        # Slurm's time-limit signal, sent by hand while both ranks wait at the start of step 3.
        signal_when_paused(slurm_env, job, gate, log, ["--signal=USR1"], "checkpoint + requeue at the next step boundary")
        wait_for(lambda: scontrol_job(job, slurm_env).get("JobState") == "COMPLETED", "the requeued job to finish",
                 job, slurm_env, log)  # fmt: skip
    finally:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30)
    info = scontrol_job(job, slurm_env)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info

    records = run_records(run, job)
    check_two_ranks_under_slurm(records, job, restarts=(0, 1))
    first, resumed = records["restart0-rank0"], records["restart1-rank0"]
    assert first["start_global_step"] == 0 and first["resumed_from"] is None
    # Requeued: resumed from Lightning's hpc checkpoint at exactly the step the signal came at, to the end.
    hpc = run / "hpc_ckpt_1.ckpt"
    assert Path(resumed["resumed_from"]) == hpc and torch.load(hpc, weights_only=False)["global_step"] == PAUSE_AT
    assert resumed["start_global_step"] == PAUSE_AT and resumed["end_global_step"] == STEPS
    final = check_finished_exactly(Path(resumed["log_dir"]))

    # The job's last validation (2 ranks, 15 images) == one process validating its final checkpoint.
    job_report = json.loads((Path(resumed["log_dir"]) / "reports" / "fit" / "classification_val.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["validate", "--config", "demo/cls.yaml", *tiny_overrides(data), "--trainer.accelerator", "cpu",
              "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.default_root_dir", str(tmp_path / "one"),
              "--ckpt_path", str(final)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    one_report = json.loads(next((tmp_path / "one").rglob("reports/validate/classification_val.json")).read_text())
    assert job_report["num_samples"] == one_report["num_samples"] == 15
    assert job_report["confusion_matrix"] == one_report["confusion_matrix"]
    assert job_report["metrics"] == one_report["metrics"]


def test_two_node_job_cancelled_resumes_with_ckpt_path_last(slurm_env, tmp_path):
    """Preemption without requeue: ``scancel`` (SIGTERM to every task) → last.ckpt at the step
    boundary → a new job on the same run dir with ``--ckpt_path last`` finishes at the expected step."""
    data = make_classification(tmp_path / "shapes", train_per_class=4, val_per_class=3, image_size=32)
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    first = submit(slurm_env, data, run, tmp_path / "first.out", gate=gate)
    try:
        signal_when_paused(slurm_env, first, gate, tmp_path / "first.out", [], "checkpoint + stop at the next step boundary")
        wait_for(lambda: scontrol_job(first, slurm_env).get("JobState") == "CANCELLED", "the job to end", first,
                 slurm_env, tmp_path / "first.out", timeout=120)  # fmt: skip
    finally:
        subprocess.run(["scancel", first], env=slurm_env, timeout=30)
    records = run_records(run, first)
    check_two_ranks_under_slurm(records, first)
    assert records["restart0-rank0"]["exception"] == "SIGTERMException"
    saved = Path(records["restart0-rank0"]["log_dir"]) / "checkpoints" / "last.ckpt"
    assert torch.load(saved, weights_only=False)["global_step"] == PAUSE_AT

    second = submit(slurm_env, data, run, tmp_path / "second.out", "--ckpt_path", "last")
    wait_for(lambda: scontrol_job(second, slurm_env).get("JobState") == "COMPLETED", "the second job to finish",
             second, slurm_env, tmp_path / "second.out")  # fmt: skip
    records = run_records(run, second)
    check_two_ranks_under_slurm(records, second)
    resumed = records["restart0-rank0"]
    assert Path(resumed["resumed_from"]) == saved and resumed["start_global_step"] == PAUSE_AT
    assert resumed["end_global_step"] == STEPS
    check_finished_exactly(Path(resumed["log_dir"]))

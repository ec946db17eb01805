"""Against a real Slurm: 2-node jobs of the demo classification config, submitted with sbatch
exactly as the README writes it (the template's own resources) plus the test's tiny overrides.

Needs the local cluster (``scripts/slurm/local_cluster.sh start``; ``make test-slurm`` starts and
stops it) and skips, saying why, when Slurm is not installed or not running. Checks that both
ranks ran under Lightning's SLURMEnvironment (world size 2, nodes n1 and n2); that the requeue
signal, sent by hand (``scancel --signal=USR1``) or by the time limit (``--time``,
``--signal=USR1@N``), makes the job checkpoint at a step boundary, requeue itself and resume to the
expected global step with no step lost or repeated, keeping one hpc checkpoint; that a signal
landing after the last step leaves the job COMPLETED; that the job's validation metrics (computed
on 2 ranks) equal a single-process validation of its final checkpoint; and that a job cancelled
with ``scancel`` resumes in a new job with ``--ckpt_path last``.
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
STEPS = 10  # 20 training images, 2 per device × 2 ranks = global batch 4 → 5 steps/epoch, 2 epochs
REQUEUE = "checkpoint + requeue at the next step boundary"  # what each rank says when the signal comes


class Gate(Callback):
    """Test hook: holds the job where the test acts on it. In the job's run ``r`` (Slurm's restart
    count) it waits after global step ``steps[r]`` (so a signal that comes then takes effect at the
    next step boundary, whatever the order of callbacks); with ``at_end``, the run after the last
    of those also waits once fit is over (Lightning's signal handlers already put back). Waiting
    means writing ``<gate>/<place>-rank<R>`` and polling for ``<gate>/<place>``, where ``place`` is
    ``step<N>`` or ``end``. Makes the moment of a signal deterministic; the signal, requeue and
    resume are all Slurm and Lightning."""

    def __init__(self, gate: str, steps: list[int] | None = None, at_end: bool = False) -> None:
        self.gate, self.steps, self.at_end = Path(gate), list(steps or []), at_end
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.restart < len(self.steps) and trainer.global_step == self.steps[self.restart]:
            self._wait(f"step{self.steps[self.restart]}", trainer.global_rank)
            self.steps[self.restart] = -1  # once

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.at_end and self.restart == len(self.steps):
            self._wait("end", trainer.global_rank)

    def _wait(self, place: str, rank: int) -> None:
        (self.gate / f"{place}-rank{rank}").touch()
        deadline = time.monotonic() + 300
        while not (self.gate / place).exists() and time.monotonic() < deadline:
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
        pytest.skip(
            f"no local Slurm running in {STATE}: scripts/slurm/local_cluster.sh start (make test-slurm does it)"
        )
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


def submit(
    env,
    data: Path,
    run: Path,
    log: Path,
    *extra: str,
    sbatch: tuple[str, ...] = (),
    gate: Path | None = None,
    steps: tuple[int, ...] = (),
    at_end: bool = False,
) -> str:
    """``sbatch [sbatch options] scripts/slurm/train.sbatch demo/cls.yaml`` + tiny overrides; the job id.
    No resources are asked for here: the template's own (2 nodes × 1 task × 1 CPU) are used."""
    gated = [] if gate is None else [
        "--trainer.callbacks+=tests.test_slurm.Gate", f"--trainer.callbacks.gate={gate}",
        f"--trainer.callbacks.steps={json.dumps(list(steps))}", f"--trainer.callbacks.at_end={str(at_end).lower()}",
    ]  # fmt: skip
    out = subprocess.run(
        ["sbatch", "--parsable", "--job-name=ravlt-test", f"--output={log}", f"--chdir={REPO}",
         f"--export=ALL,PYTHON={sys.executable},RUN_DIR={run}", *sbatch,
         "scripts/slurm/train.sbatch", "demo/cls.yaml", *tiny_overrides(data),
         "--trainer.callbacks+=ravlt_pl.callbacks.RunInfo", *gated, *extra],
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


def said(log: Path, message: str) -> int:
    return log.read_text().count(message) if log.exists() else 0


def act_at(env, job: str, gate: Path, log: Path, place: str, scancel: list[str] | None, message: str) -> None:
    """Both ranks waiting at ``place`` → ``scancel ...`` (None: the test sends nothing, Slurm
    will) → one more ``message`` from each rank → let them go on."""
    try:
        wait_for(lambda: len(list(gate.glob(f"{place}-rank*"))) == 2, f"both ranks at {place}", job, env, log)
        before = said(log, message)
        if scancel is not None:
            subprocess.run(["scancel", *scancel, job], env=env, check=True, timeout=30)
        wait_for(lambda: said(log, message) == before + 2, f"'{message}' from both ranks", job, env, log, timeout=120)
    finally:
        (gate / place).touch()


def wait_until_completed(env, job: str, log: Path) -> dict[str, str]:
    wait_for(lambda: scontrol_job(job, env).get("JobState") == "COMPLETED", "the job to complete", job, env, log)
    return scontrol_job(job, env)


def run_records(run: Path, job: str) -> dict[str, dict]:
    return {
        p.stem.split(f"job{job}-")[1]: json.loads(p.read_text())
        for p in (run / "run_info").glob(f"fit-job{job}-*.json")
    }


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


def test_two_node_job_requeues_on_usr1_keeps_one_checkpoint_completes_and_matches_one_process(slurm_env, tmp_path):
    data = make_classification(tmp_path / "shapes", train_per_class=4, val_per_class=3, image_size=32)  # 15 val: odd
    run, gate, log = tmp_path / "run", tmp_path / "gate", tmp_path / "job.out"
    gate.mkdir()
    job = submit(slurm_env, data, run, log, gate=gate, steps=(3, 6), at_end=True)
    try:
        # Slurm's time-limit signal, sent by hand while both ranks wait after step 3, then after
        # step 6 in the requeued run; then once more after the last step of the second requeued run.
        act_at(slurm_env, job, gate, log, "step3", ["--signal=USR1"], REQUEUE)
        act_at(slurm_env, job, gate, log, "step6", ["--signal=USR1"], REQUEUE)
        act_at(slurm_env, job, gate, log, "end", ["--signal=USR1"], "SIGUSR1: training has finished, nothing to do")
        info = wait_until_completed(slurm_env, job, log)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30)
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", info  # not FAILED 0:138 from the late signal

    records = run_records(run, job)
    check_two_ranks_under_slurm(records, job, restarts=(0, 1, 2))
    first, second, third = (records[f"restart{r}-rank0"] for r in (0, 1, 2))
    assert first["start_global_step"] == 0 and first["resumed_from"] is None
    # Each requeued run resumed from Lightning's hpc checkpoint at exactly the step the signal came at;
    # each requeue deleted the checkpoint before it, so one hpc checkpoint is left.
    assert Path(second["resumed_from"]) == run / "hpc_ckpt_1.ckpt" and second["start_global_step"] == 3
    assert Path(third["resumed_from"]) == run / "hpc_ckpt_2.ckpt" and third["start_global_step"] == 6
    assert sorted(p.name for p in run.glob("hpc_ckpt_*")) == ["hpc_ckpt_2.ckpt"]
    assert torch.load(run / "hpc_ckpt_2.ckpt", weights_only=False)["global_step"] == 6
    assert third["end_global_step"] == STEPS
    final = check_finished_exactly(Path(third["log_dir"]))

    # The job's last validation (2 ranks, 15 images) == one process validating its final checkpoint.
    job_report = json.loads((Path(third["log_dir"]) / "reports" / "fit" / "classification_val.json").read_text())
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


def test_two_node_job_at_its_time_limit_requeues_and_resumes_exactly(slurm_env, tmp_path):
    """The time-limit path itself: ``--time=3 --signal=USR1@60``, no signal sent by the test.
    slurmctld checks limits every 30 s and may signal up to 60 s early, so the signal comes 60-120 s
    after the start: after the run's imports and setup (a signal before fit has begun would still
    kill it), and while the job waits after step 3, or a few steps earlier. The requeued job gets a
    longer limit so that it finishes."""
    data = make_classification(tmp_path / "shapes", train_per_class=4, val_per_class=3, image_size=32)
    run, gate, log = tmp_path / "run", tmp_path / "gate", tmp_path / "job.out"
    gate.mkdir()
    job = submit(slurm_env, data, run, log, sbatch=("--time=3", "--signal=USR1@60"), gate=gate, steps=(3,))
    try:
        try:
            wait_for(lambda: said(log, REQUEUE) == 2, "Slurm's time-limit signal", job, slurm_env, log, timeout=300)
        finally:
            (gate / "step3").touch()
        wait_for(lambda: scontrol_job(job, slurm_env).get("Restarts") == "1", "the requeue", job, slurm_env, log)
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=15"], env=slurm_env, check=True, timeout=30)
        info = wait_until_completed(slurm_env, job, log)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    records = run_records(run, job)
    check_two_ranks_under_slurm(records, job, restarts=(0, 1))
    resumed, hpc = records["restart1-rank0"], run / "hpc_ckpt_1.ckpt"
    signalled_at = torch.load(hpc, weights_only=False)["global_step"]
    assert Path(resumed["resumed_from"]) == hpc and resumed["start_global_step"] == signalled_at > 0
    assert resumed["end_global_step"] == STEPS
    check_finished_exactly(Path(resumed["log_dir"]))


def test_two_node_job_cancelled_resumes_with_ckpt_path_last(slurm_env, tmp_path):
    """Preemption without requeue: ``scancel`` (SIGTERM to every task) → last.ckpt at the step
    boundary → a new job on the same run dir with ``--ckpt_path last`` finishes at the expected step."""
    data = make_classification(tmp_path / "shapes", train_per_class=4, val_per_class=3, image_size=32)
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    first = submit(slurm_env, data, run, tmp_path / "first.out", gate=gate, steps=(3,))
    try:
        act_at(
            slurm_env, first, gate, tmp_path / "first.out", "step3", [], "checkpoint + stop at the next step boundary"
        )
        wait_for(lambda: scontrol_job(first, slurm_env).get("JobState") == "CANCELLED", "the job to end", first,
                 slurm_env, tmp_path / "first.out", timeout=120)  # fmt: skip
    finally:
        subprocess.run(["scancel", first], env=slurm_env, timeout=30)
    records = run_records(run, first)
    check_two_ranks_under_slurm(records, first)
    assert records["restart0-rank0"]["exception"] == "SIGTERMException"
    saved = Path(records["restart0-rank0"]["log_dir"]) / "checkpoints" / "last.ckpt"
    assert torch.load(saved, weights_only=False)["global_step"] == 3

    second = submit(slurm_env, data, run, tmp_path / "second.out", "--ckpt_path", "last")
    wait_for(lambda: scontrol_job(second, slurm_env).get("JobState") == "COMPLETED", "the second job to finish",
             second, slurm_env, tmp_path / "second.out")  # fmt: skip
    records = run_records(run, second)
    check_two_ranks_under_slurm(records, second)
    resumed = records["restart0-rank0"]
    assert Path(resumed["resumed_from"]) == saved and resumed["start_global_step"] == 3
    assert resumed["end_global_step"] == STEPS
    check_finished_exactly(Path(resumed["log_dir"]))


def test_two_node_job_trains_from_shards_and_resumes_mid_epoch_after_a_requeue(slurm_env, tmp_path):
    """The same 2-node job reading WebDataset shards (written by the converter): both ranks stream
    their share, the requeue signal after step 3 (mid epoch 0) resumes at step 3 and the job ends
    at the expected step; its 2-rank validation scored each of the 15 images once."""
    from ravlt_pl.data.shards import write_shards

    source = make_classification(tmp_path / "shapes", train_per_class=4, val_per_class=3, image_size=32)
    data = write_shards(source, tmp_path / "shapes-wds", shard_size=3)
    run, gate, log = tmp_path / "run", tmp_path / "gate", tmp_path / "job.out"
    gate.mkdir()
    job = submit(slurm_env, data, run, log, gate=gate, steps=(3,))
    try:
        act_at(slurm_env, job, gate, log, "step3", ["--signal=USR1"], REQUEUE)
        info = wait_until_completed(slurm_env, job, log)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    records = run_records(run, job)
    check_two_ranks_under_slurm(records, job, restarts=(0, 1))
    resumed = records["restart1-rank0"]
    assert Path(resumed["resumed_from"]) == run / "hpc_ckpt_1.ckpt" and resumed["start_global_step"] == 3
    assert resumed["end_global_step"] == STEPS
    check_finished_exactly(Path(resumed["log_dir"]))
    report = json.loads((Path(resumed["log_dir"]) / "reports" / "fit" / "classification_val.json").read_text())
    assert report["num_samples"] == 15 and sum(map(sum, report["confusion_matrix"])) == 15

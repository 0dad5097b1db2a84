"""launch/tpu/run_on_pod.py: the commands that run a job on a TPU pod, GKE (xpk) or SLURM."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bpgo_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu" / "run_on_pod.py"
TRAIN = ("python", "launch/train.py", "--config=configs/sd_aesthetic.py")


def _launcher():
    spec = importlib.util.spec_from_file_location("run_on_pod", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pod = _launcher()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_tpu_vm_mounts_the_bucket_sets_up_and_runs_on_every_worker():
    opts = pod.Options(
        target="tpu_vm",
        command=TRAIN,
        workdir="gs://my-bucket/runs/sd",
        setup=("cd bpgo-jax && pip install -e .",),
        copy=("my_config.py",),
        name="my-v5p",
        zone="us-east5-a",
        project="proj",
    )
    where = ["--zone=us-east5-a", "--project=proj", "--worker=all"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p"]
    point = "/tmp/bpgo-gcs/my-bucket"
    assert pod.plan(opts) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "my_config.py",
            "my-v5p:bpgo-jax/my_config.py",
        ]
        + where,
        [
            *ssh,
            f"--command=mkdir -p {point} && (mountpoint -q {point} || "
            f"gcsfuse --implicit-dirs my-bucket {point})",
            *where,
        ],
        [*ssh, "--command=cd bpgo-jax && pip install -e .", *where],
        [
            *ssh,
            "--command=cd bpgo-jax && python launch/train.py --config=configs/sd_aesthetic.py "
            f"--workdir={point}/runs/sd --distributed",
            *where,
        ],
    ]
    detached = pod.plan(opts._replace(detach=True, workdir="/mnt/shared/run", copy=(), setup=()))
    assert detached[-1][6] == (
        "--command=cd bpgo-jax && nohup python launch/train.py "
        "--config=configs/sd_aesthetic.py --workdir=/mnt/shared/run --distributed "
        "> bpgo-job.log 2>&1 < /dev/null &"
    )


def test_xpk_attaches_the_bucket_and_creates_a_restartable_workload():
    opts = pod.Options(
        target="xpk",
        command=(*TRAIN, "--distributed"),
        workdir="gs://my-bucket/runs/sd",
        env=("HF_HOME=/tmp/hf",),
        cluster="gke",
        tpu_type="v5p-16",
        num_slices=2,
        docker_image="gcr.io/p/bpgo:1",
        zone="us-east5-a",
    )
    attach, create = pod.plan(opts)
    assert attach == [
        "xpk", "storage", "attach", "my-bucket-fuse", "--type=gcsfuse", "--bucket=my-bucket",
        "--mount-point=/tmp/bpgo-gcs/my-bucket", "--readonly=false", "--size=1",
        "--auto-mount=true", "--cluster=gke", "--zone=us-east5-a",
    ]  # fmt: skip
    assert create == [
        "xpk", "workload", "create", "--workload=bpgo", "--cluster=gke", "--zone=us-east5-a",
        "--tpu-type=v5p-16", "--num-slices=2", "--docker-image=gcr.io/p/bpgo:1",
        "--max-restarts=10", "--env=HF_HOME=/tmp/hf",
        # --distributed was given: not added twice.
        "--command=python launch/train.py --config=configs/sd_aesthetic.py --distributed "
        "--workdir=/tmp/bpgo-gcs/my-bucket/runs/sd",
    ]  # fmt: skip


def test_slurm_takes_the_coordinator_from_the_job_environment():
    opts = pod.Options(
        target="slurm",
        command=("python", "launch/train.py", "--config.sample.negative_prompt=it's $5"),
        workdir="/shared/runs/sd",
        nodes=2,
        gpus_per_node=8,
        port=4321,
    )
    (step,) = pod.plan(opts)
    assert step[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "bash"]
    assert step[5] == "-c"
    # What each task's shell makes of the job line: SLURM's `scontrol show hostnames` prints
    # one host a line (a shell function stands in for it: no SLURM here), and `printf`
    # shows the arguments the trainer would get.
    job = step[6].replace("python launch/train.py", "printf '%s\\n'", 1)
    fake = (
        'scontrol() { [ "$*" = "show hostnames node[007-008]" ] && printf "node007\\nnode008\\n"; }'
    )
    env = {"PATH": os.environ["PATH"], "SLURM_NODELIST": "node[007-008]"}
    env.update(SLURM_NTASKS="2", SLURM_PROCID="1")
    out = subprocess.run(["bash", "-c", f"{fake}; {job}"], capture_output=True, text=True, env=env)
    assert out.stdout.splitlines() == [
        "--config.sample.negative_prompt=it's $5",  # the user's `$` is not expanded
        "--workdir=/shared/runs/sd",
        "--coordinator=node007:4321",
        "--num_processes=2",
        "--process_id=1",
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target": "tpu_vm", "zone": "z"}, "--target=tpu_vm needs --name"),
        ({"target": "slurm", "workdir": "gs://bucket/run"}, "a SLURM job writes to a filesystem"),
        (
            {"target": "tpu_vm", "name": "p", "zone": "z", "workdir": "gs://Bad_Bucket/run"},
            "not gs://BUCKET/PATH",
        ),
        ({"target": "xpk", "cluster": "c", "tpu_type": "v5p-8"}, "one of --docker_image or"),
        ({"target": "slurm", "env": ("1X=2",)}, "--env=1X=2: write NAME=VALUE"),
        ({"target": "slurm", "command": ()}, "give the command to run after --"),
        ({"target": "slurm", "command": (*TRAIN, "--workdir=a"), "workdir": "b"}, "not both"),
    ],
)
def test_incomplete_targets_are_refused(fields, message):
    opts = pod.Options(**{"command": TRAIN, **fields})
    with pytest.raises(UserError, match=re.escape(message)):
        pod.plan(opts)


def test_dry_run_prints_the_plan_and_errors_are_one_line():
    args = ["--target=tpu_vm", "--name=pod", "--zone=us-east5-a", "--workdir=gs://bkt/r"]
    proc = _run(*args, "--dry_run", "--", *TRAIN)
    assert proc.returncode == 0, proc.stderr
    opts = pod.Options(
        target="tpu_vm", command=TRAIN, workdir="gs://bkt/r", name="pod", zone="us-east5-a"
    )
    # The command after -- keeps its paths (configs/... is the workers' checkout's).
    assert [shlex.split(line) for line in proc.stdout.splitlines()] == pod.plan(opts)
    proc = _run("--target=slurm", "--workdir=gs://bkt/r", "--dry_run", "--", *TRAIN)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: --workdir=gs://bkt/r: a SLURM job") and (
        proc.stderr.count("\n") == 1
    )

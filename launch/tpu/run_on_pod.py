r"""Runs one command in every process of a TPU pod (gcloud or xpk) or of a SLURM job.

    python launch/tpu/run_on_pod.py --target=tpu_vm --name=my-v5p --zone=us-east5-a \
        --workdir=gs://my-bucket/runs/sd --setup="cd bpgo-jax && pip install -e '.[tpu]'" -- \
        python launch/train.py --config=configs/sd_aesthetic.py --config.model.init=/data/sd15
    python launch/tpu/run_on_pod.py --target=xpk --cluster=my-gke --tpu_type=v5p-16 \
        --base_docker_image=python:3.11 --workdir=gs://my-bucket/runs/sd -- \
        python launch/train.py --config=configs/sd_aesthetic.py
    python launch/tpu/run_on_pod.py --target=slurm --nodes=2 --gpus_per_node=8 \
        --workdir=/shared/runs/sd -- python launch/train.py --config=configs/sd_aesthetic.py

Everything after `--` is the command; each process runs it, and a training
command (`launch/train.py`, `bpgo-train`) gets the flags that join its
processes into one job: `--distributed` on TPU pods and GKE (JAX detects the
hosts), the coordinator spelt out from SLURM's environment under `srun`
(the first host of `$SLURM_NODELIST`, `$SLURM_NTASKS`, `$SLURM_PROCID`).
`--dry_run` prints the commands, one a line, and runs none.

- tpu_vm: `gcloud compute tpus tpu-vm scp` of the `--copy` files into
  `--repo_dir` (the checkout on every worker), `ssh --worker=all` of the
  `--setup` commands (in the home directory, so one may clone the checkout),
  then of the job, in `--repo_dir`. `--detach` leaves the job running after ssh
  returns, its output in `--log` on each worker.
- xpk: `xpk workload create` on a GKE cluster, restarted up to
  `--max_restarts` times (a preempted run exits with code 75 after saving
  and resumes from its checkpoint).
- slurm: one `srun` task per node, each driving the node's GPUs.

`--workdir` (appended to the command) may be a GCS path, gs://BUCKET/PATH.
With `--gcs=native` the command gets the gs:// URL itself and writes to the
bucket through its own clients (Orbax's checkpoints through TensorStore, the
other files through gcsfs: install with `pip install -e '.[tpu,gcs]'`); the
workdir's lock is then a lock object in the bucket, so a second run on the
same workdir is refused from any host (docs/pods.md). With `--gcs=fuse` (the
default; tpu_vm and xpk) the bucket is mounted with Cloud Storage FUSE at
`--mount_root/BUCKET` on every worker (tpu_vm: `gcsfuse`; xpk: `xpk storage
attach --type=gcsfuse`) and the run writes to that local path.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import NamedTuple

from absl import flags

from bpgo_jax import runtime
from bpgo_jax.errors import EXIT_ERROR, UserError

TARGETS = ("tpu_vm", "xpk", "slurm")
GCS_MODES = ("fuse", "native")  # how a gs:// --workdir reaches the command
# Commands whose processes join one multi-process job (`runtime.define_distributed_flags`).
DISTRIBUTED = ("launch/train.py", "bpgo-train")
_GCS = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(/.*)?")


class Expand(str):
    """An argument the process's shell expands (`$VAR`, `$(...)`): double-quoted, not escaped."""


class Options(NamedTuple):
    """What `plan` needs: the flags' values and the command."""

    target: str
    command: tuple[str, ...]
    workdir: str = ""
    gcs: str = "fuse"
    env: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    copy: tuple[str, ...] = ()
    repo_dir: str = "bpgo-jax"
    mount_root: str = "/tmp/bpgo-gcs"
    # tpu_vm
    name: str = ""
    zone: str = ""
    project: str = ""
    worker: str = "all"
    detach: bool = False
    log: str = "bpgo-job.log"
    # xpk
    cluster: str = ""
    workload: str = "bpgo"
    tpu_type: str = ""
    num_slices: int = 1
    docker_image: str = ""
    base_docker_image: str = ""
    max_restarts: int = 10
    # slurm
    nodes: int = 1
    gpus_per_node: int = 0
    partition: str = ""
    port: int = 12355


def _gcs_match(workdir: str) -> re.Match | None:
    """The bucket and path of a gs:// workdir (None for another path); raises for a bad one."""
    if not workdir.startswith("gs://"):
        return None
    match = _GCS.fullmatch(workdir.rstrip("/"))
    if not match:
        raise UserError(f"--workdir={workdir}: not gs://BUCKET/PATH with a valid bucket name")
    return match


def gcs_mount(workdir: str, mount_root: str) -> tuple[str, str] | None:
    """`(bucket, local path)` of a gs:// workdir mounted under `mount_root`, else None."""
    match = _gcs_match(workdir)
    if match is None:
        return None
    bucket = match[1]
    return bucket, f"{mount_root.rstrip('/')}/{bucket}{match[2] or ''}"


def _mount(opts: Options) -> tuple[str, str] | None:
    """The FUSE mount of a gs:// workdir with `--gcs=fuse`; None when the command
    writes the URL itself (`--gcs=native`) or the workdir is a path."""
    if opts.gcs == "native":
        _gcs_match(opts.workdir)  # a bad bucket name still fails here
        return None
    return gcs_mount(opts.workdir, opts.mount_root)


def job_command(opts: Options, workdir: str) -> list[str]:
    """The command with `--workdir` and, for a training command, the flags of a
    multi-process job on `opts.target`."""
    command = list(opts.command)
    if not command:
        raise UserError("give the command to run after --, e.g. -- python launch/train.py ...")
    if workdir:
        if any(a == "--workdir" or a.startswith("--workdir=") for a in command):
            raise UserError("give --workdir to run_on_pod.py or to the command, not both")
        command.append(f"--workdir={workdir}")
    trains = any(a.endswith(DISTRIBUTED) for a in command if not a.startswith("-"))
    given = {a.split("=", 1)[0] for a in command}
    if trains and not given & {"--distributed", "--coordinator", "--process_id"}:
        if opts.target == "slurm":
            first_host = '$(scontrol show hostnames "$SLURM_NODELIST" | head -n 1)'
            command += [
                Expand(f"--coordinator={first_host}:{opts.port}"),
                Expand("--num_processes=$SLURM_NTASKS"),
                Expand("--process_id=$SLURM_PROCID"),
            ]
        else:
            command.append("--distributed")
    return command


def _shell(command: Sequence[str]) -> str:
    """`command` as one shell line: arguments quoted, `Expand` ones left to the shell."""
    return " ".join(f'"{a}"' if isinstance(a, Expand) else shlex.quote(a) for a in command)


def _env_prefix(env: Sequence[str]) -> list[str]:
    return ["env", *env] if env else []


def _gcloud(opts: Options, verb: str, *args: str) -> list[str]:
    where = [f"--zone={opts.zone}"] + ([f"--project={opts.project}"] if opts.project else [])
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *where, f"--worker={opts.worker}"]


def _tpu_vm(opts: Options) -> list[list[str]]:
    if not opts.name or not opts.zone:
        raise UserError("--target=tpu_vm needs --name (the TPU VM) and --zone")
    mount = _mount(opts)
    steps = [
        _gcloud(opts, "scp", path, f"{opts.name}:{opts.repo_dir}/{path}") for path in opts.copy
    ]
    ssh = lambda remote: _gcloud(opts, "ssh", opts.name, f"--command={remote}")
    if mount:
        bucket, local = mount
        point = f"{opts.mount_root.rstrip('/')}/{bucket}"
        steps.append(
            ssh(
                f"mkdir -p {shlex.quote(point)} && (mountpoint -q {shlex.quote(point)} || "
                f"gcsfuse --implicit-dirs {shlex.quote(bucket)} {shlex.quote(point)})"
            )
        )
    steps += [ssh(command) for command in opts.setup]  # in the home directory: may clone
    job = _shell([*_env_prefix(opts.env), *job_command(opts, mount[1] if mount else opts.workdir)])
    if opts.detach:
        job = f"nohup {job} > {shlex.quote(opts.log)} 2>&1 < /dev/null &"
    steps.append(ssh(f"cd {shlex.quote(opts.repo_dir)} && {job}"))
    return steps


def _xpk(opts: Options) -> list[list[str]]:
    if not opts.cluster or not opts.tpu_type:
        raise UserError(
            "--target=xpk needs --cluster (the GKE cluster) and --tpu_type (e.g. v5p-16)"
        )
    if bool(opts.docker_image) == bool(opts.base_docker_image):
        raise UserError("--target=xpk needs one of --docker_image or --base_docker_image")
    where = [f"--cluster={opts.cluster}"]
    where += [f"--project={opts.project}"] if opts.project else []
    where += [f"--zone={opts.zone}"] if opts.zone else []
    steps, mount = [], _mount(opts)
    if mount:
        bucket, _ = mount
        attach = ["xpk", "storage", "attach", f"{bucket}-fuse", "--type=gcsfuse"]
        attach += [f"--bucket={bucket}", f"--mount-point={opts.mount_root.rstrip('/')}/{bucket}"]
        steps.append([*attach, "--readonly=false", "--size=1", "--auto-mount=true", *where])
    image = (
        [f"--docker-image={opts.docker_image}"]
        if opts.docker_image
        else [f"--base-docker-image={opts.base_docker_image}", "--script-dir=."]
    )
    command = _shell(job_command(opts, mount[1] if mount else opts.workdir))
    for item in opts.setup[::-1]:
        command = f"{item} && {command}"
    create = ["xpk", "workload", "create", f"--workload={opts.workload}", *where]
    create += [f"--tpu-type={opts.tpu_type}", f"--num-slices={opts.num_slices}", *image]
    create += [f"--max-restarts={opts.max_restarts}", *[f"--env={item}" for item in opts.env]]
    steps.append([*create, f"--command={command}"])
    return steps


def _slurm(opts: Options) -> list[list[str]]:
    if opts.workdir.startswith("gs://") and opts.gcs != "native":
        raise UserError(
            f"--workdir={opts.workdir}: a SLURM job writes to a filesystem every node shares "
            "(e.g. /shared/runs/NAME), or to GCS itself with --gcs=native"
        )
    _gcs_match(opts.workdir)
    if opts.copy or opts.detach:
        raise UserError("--copy and --detach are for --target=tpu_vm")
    srun = ["srun", f"--nodes={opts.nodes}", "--ntasks-per-node=1"]
    srun += [f"--gpus-per-node={opts.gpus_per_node}"] if opts.gpus_per_node else []
    srun += [f"--partition={opts.partition}"] if opts.partition else []
    job = _shell([*_env_prefix(opts.env), *job_command(opts, opts.workdir)])
    steps = [[*srun, "bash", "-c", command] for command in opts.setup]
    return [*steps, [*srun, "bash", "-c", job]]


def plan(opts: Options) -> list[list[str]]:
    """The commands that run `opts.command` on `opts.target`, in order (argv lists)."""
    if opts.target not in TARGETS:
        raise UserError(f"--target={opts.target} is not one of {', '.join(TARGETS)}")
    if opts.gcs not in GCS_MODES:
        raise UserError(f"--gcs={opts.gcs} is not one of {', '.join(GCS_MODES)}")
    for item in opts.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
            raise UserError(f"--env={item}: write NAME=VALUE")
    return {"tpu_vm": _tpu_vm, "xpk": _xpk, "slurm": _slurm}[opts.target](opts)


def define_flags() -> None:
    """The launcher's flags (defined when it runs, so tests can import `plan`)."""
    d = Options._field_defaults
    flags.DEFINE_enum("target", None, TARGETS, "Where to run: a TPU VM pod, GKE via xpk, SLURM.")
    flags.DEFINE_bool("dry_run", False, "Print the commands, one a line; run none.")
    flags.DEFINE_string("workdir", "", "The run's --workdir: a path, or gs://BUCKET/PATH.")
    flags.DEFINE_enum(
        "gcs",
        d["gcs"],
        GCS_MODES,
        "How a gs:// --workdir reaches the command: native (the URL; the run writes to GCS "
        "itself) or fuse (a Cloud Storage FUSE mount; tpu_vm, xpk).",
    )
    flags.DEFINE_multi_string("env", [], "NAME=VALUE set for the command (repeatable).")
    flags.DEFINE_multi_string(
        "setup", [], "A shell command run first in every process (tpu_vm: in the home directory)."
    )
    flags.DEFINE_multi_string("copy", [], "tpu_vm: a local file copied to --repo_dir/FILE.")
    flags.DEFINE_string("repo_dir", d["repo_dir"], "The checkout on every worker (tpu_vm).")
    flags.DEFINE_string("mount_root", d["mount_root"], "Where gs:// buckets are mounted.")
    flags.DEFINE_string("name", "", "tpu_vm: the TPU VM's name.")
    flags.DEFINE_string("zone", "", "tpu_vm, xpk: the zone.")
    flags.DEFINE_string("project", "", "tpu_vm, xpk: the Google Cloud project ('' = gcloud's).")
    flags.DEFINE_string("worker", d["worker"], "tpu_vm: the workers to run on.")
    flags.DEFINE_bool("detach", False, "tpu_vm: keep the job running after ssh returns.")
    flags.DEFINE_string("log", d["log"], "tpu_vm --detach: each worker's output file.")
    flags.DEFINE_string("cluster", "", "xpk: the GKE cluster.")
    flags.DEFINE_string("workload", d["workload"], "xpk: the workload's name.")
    flags.DEFINE_string("tpu_type", "", "xpk: the slice, e.g. v5p-8, v5litepod-16, v6e-8.")
    flags.DEFINE_integer("num_slices", 1, "xpk: slices (multi-slice).", lower_bound=1)
    flags.DEFINE_string("docker_image", "", "xpk: an image holding bpgo-jax.")
    flags.DEFINE_string("base_docker_image", "", "xpk: a base image; the checkout is added.")
    flags.DEFINE_integer("max_restarts", d["max_restarts"], "xpk: restarts after a failure.")
    flags.DEFINE_integer("nodes", 1, "slurm: nodes, one process each.", lower_bound=1)
    flags.DEFINE_integer("gpus_per_node", 0, "slurm: GPUs per node (0: the partition's).")
    flags.DEFINE_string("partition", "", "slurm: the partition.")
    flags.DEFINE_integer("port", d["port"], "slurm: the coordinator's port on the first node.")
    flags.mark_flags_as_required(["target"])


def main(argv: list[str]) -> None:
    args = flags.FLAGS
    values = {k: getattr(args, k) for k in Options._fields if k != "command"}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    opts = Options(command=tuple(argv[1:]), **values)
    steps = plan(opts)
    if args.dry_run:
        for step in steps:
            print(shlex.join(step))
        return
    for step in steps:
        print("+ " + shlex.join(step), flush=True)
        code = subprocess.run(step).returncode
        if code:
            sys.exit(code)  # the job's own code (75: preempted, rerun to resume)


def run() -> None:
    """`main` under absl with `runtime.parse_flags`; a `UserError` is one `error:` line.

    Not `runtime.run`: it resolves `--config=configs/...` to this checkout's
    files, and the command after `--` must keep its paths for the workers.
    """
    from absl import app

    define_flags()

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_ERROR)

    app.run(guarded, flags_parser=runtime.parse_flags)


if __name__ == "__main__":
    run()

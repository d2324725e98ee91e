"""`dx train align|instruct|prpo`: parse, prepare the run, launch workers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dxcli.cli.common import DEFAULT_PROFILE_NAME, ProfileOpt, SetOpt, console, err_console, resolve_config

app = typer.Typer(help="Train DX-LLaVA: align -> instruct -> prpo.", no_args_is_help=True)

DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Dataset tree (ROOT/<domain>/<split>/<label>/..) or a records file (JSON/JSONL).")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image root for a records file.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Starting checkpoint (or a run folder); default: the profile's model.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run folder (config.yaml, metrics.jsonl, checkpoints, model/).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Start over in an existing --out (deletes it).")]
SkipBadOpt = Annotated[bool, typer.Option("--skip-bad", help="Skip records whose images are missing/unreadable.")]
NprocOpt = Annotated[Optional[int], typer.Option("--nproc-per-node", help="Processes per node (overrides the profile).")]
NnodesOpt = Annotated[Optional[int], typer.Option("--nnodes", help="Number of nodes (torchrun): run the same command on every node, each with its --node-rank; --out must be one folder every node shares, at the same path.")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", help="This node's rank, 0..nnodes-1. Node 0 prepares --out and saves the model; the others wait for it and only run their workers.")]
MasterOpt = Annotated[Optional[str], typer.Option("--master-addr", help="Node 0's address, reachable from every node: required with --nnodes > 1; with --hostfile the DeepSpeed launcher finds it. One node: 127.0.0.1.")]
PortOpt = Annotated[Optional[int], typer.Option("--master-port", help="Rendezvous port, the same on every node (default: a free one on one node, 29500 on several).")]
HostfileOpt = Annotated[Optional[Path], typer.Option("--hostfile", help="DeepSpeed hostfile ('HOST slots=N' lines): run dx once, on the first host; the DeepSpeed launcher starts every host's workers over pdsh/ssh. --out must be shared.")]


def _launch_spec(resolved, out: Path, node_rank: int, master_addr: str | None, master_port: int | None,
                 hostfile: Path | None):
    """The launch flags, checked; on a node other than 0, after node 0 has prepared --out. Both
    before the heavy imports: a missing flag or a node 0 that never starts fails in seconds."""
    from dxcli.jobs.nodes import LaunchSpec, check_spec, wait_for_node0

    spec = LaunchSpec(nproc_per_node=resolved.config.hardware.nproc_per_node, nnodes=resolved.config.hardware.nnodes,
                      node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                      hostfile=str(hostfile) if hostfile else None)
    check_spec(spec)
    if spec.joins_node0:
        wait_for_node0(out, spec, say=err_console.print)
    return spec


def _done(label: str, saved: Path, out: Path, node_rank: int) -> None:
    """The last line: the model and metrics, which only node 0 writes."""
    if node_rank > 0:
        console.print(f"[green]node {node_rank} done[/]: its {label} workers finished (node 0 saves the run in {out})")
    else:
        console.print(f"[green]{label} done[/]: model in {saved}, metrics in {out / 'metrics.jsonl'}")


def _sft(stage: str, data, images, model, out, profile, sets, resume, force, skip_bad, nproc, nnodes,
         node_rank, master_addr, master_port, hostfile) -> None:
    resolved = resolve_config(profile, sets, {"hardware.nproc_per_node": nproc, "hardware.nnodes": nnodes})
    spec = _launch_spec(resolved, out, node_rank, master_addr, master_port, hostfile)
    from dxcli.jobs.stages import run_sft_stage

    saved = run_sft_stage(stage, out=out, resolved=resolved, data=data, images=images, model=model, resume=resume,
                          force=force, skip_bad=skip_bad, spec=spec, say=err_console.print)
    _done(stage, saved, out, node_rank)


def _sft_command(stage: str, doc: str):
    """align and instruct take the same flags; only the stage differs."""

    def command(
        out: OutOpt, data: DataOpt = None, images: ImagesOpt = None, model: ModelOpt = None,
        profile: ProfileOpt = DEFAULT_PROFILE_NAME, sets: SetOpt = None, resume: ResumeOpt = False,
        force: ForceOpt = False, skip_bad: SkipBadOpt = False, nproc_per_node: NprocOpt = None,
        nnodes: NnodesOpt = None, node_rank: NodeRankOpt = 0, master_addr: MasterOpt = None,
        master_port: PortOpt = None, hostfile: HostfileOpt = None,
    ) -> None:
        _sft(stage, data, images, model, out, profile, sets, resume, force, skip_bad, nproc_per_node, nnodes,
             node_rank, master_addr, master_port, hostfile)

    command.__doc__ = doc
    command.__name__ = stage
    return command


app.command("align")(_sft_command("align", """Stage 1, feature alignment: only the projector and binary head learn.

    Example: dx train align --data demo-data --out runs/align --profile cpu-tiny
    """))
app.command("instruct")(_sft_command("instruct", """Stage 2, visual instruction tuning: projector, LLM and head learn (L = L_lm + alpha * L_bin).

    Example: dx train instruct --data demo-data --model runs/align --out runs/instruct --profile cpu-tiny
    """))


@app.command()
def prpo(
    out: OutOpt, model: ModelOpt = None, data: DataOpt = None, images: ImagesOpt = None,
    algo: Annotated[Optional[str], typer.Option("--algo", help="prpo (paragraph rewards) or grpo (baseline).")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="gt: ground truth; majority/none: test-time RL on unlabeled images (labels only reported).")] = None,
    clip: Annotated[Optional[str], typer.Option("--clip", help="CLIP for the visual consistency reward (off without it): a CLIPModel folder or hub id, or open_clip:ARCH[:PRETRAINED_OR_FILE] (pip install \"dxcli\\[clip]\").")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of a dataset tree to draw prompts from (test for test-time RL).")] = "train",
    domain: Annotated[Optional[list[str]], typer.Option("--domain", help="Only these domains of a dataset tree (repeatable).")] = None,
    profile: ProfileOpt = DEFAULT_PROFILE_NAME, sets: SetOpt = None, resume: ResumeOpt = False,
    force: ForceOpt = False, nproc_per_node: NprocOpt = None, nnodes: NnodesOpt = None,
    node_rank: NodeRankOpt = 0, master_addr: MasterOpt = None, master_port: PortOpt = None,
    hostfile: HostfileOpt = None,
) -> None:
    """Stage 3, RL: PRPO (paragraph-level rewards) or the GRPO baseline, from an instruct checkpoint.

    Example: dx train prpo --model runs/instruct --data demo-data --out runs/prpo --algo prpo
    Example (test-time RL on a held-out domain): dx train prpo --model runs/instruct --data DF_R5 --domain sit --split test --labels none --out runs/ttrl

    Example (2 nodes; the same command on each, --node-rank 1 on the second, --out on a shared disk): dx train prpo --model /shared/instruct --data /shared/DF_R5 --out /shared/runs/prpo --profile h100x2 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
    """
    resolved = resolve_config(profile, sets, {"hardware.nproc_per_node": nproc_per_node, "hardware.nnodes": nnodes,
                                              "prpo.algo": algo, "prpo.labels": labels, "prpo.clip": clip})
    spec = _launch_spec(resolved, out, node_rank, master_addr, master_port, hostfile)
    from dxcli.jobs.stages import run_prpo_stage

    saved = run_prpo_stage(out=out, resolved=resolved, model=model, data=data, images=images, split=split,
                           domains=domain, resume=resume, force=force, spec=spec, say=err_console.print)
    _done(resolved.config.prpo.algo, saved, out, node_rank)

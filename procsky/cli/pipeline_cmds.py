"""``procsky run``, ``procsky graph`` and ``procsky report``."""

from __future__ import annotations

import json
import signal
import sys
import threading

import click

from procsky.cli import main

__all__ = ["run_cmd", "graph_cmd", "report_cmd"]


def _split(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


_common = [
    click.argument("pipeline"),
    click.option("--repo", "repo", required=True, type=click.Path(file_okay=False), help="Repository root."),
    click.option("--where", default=None, help="Data-ID expression, e.g. \"visit IN (1,2) AND band='g'\"."),
    click.option("--output", required=True, help="Output run (an existing run is continued)."),
    click.option("--tasks", default=None, help="Comma-separated task labels to run (inputs must exist)."),
    click.option(
        "-c",
        "--config",
        "config",
        multiple=True,
        metavar="TASK.FIELD=VALUE",
        help="Configuration override (value parsed as YAML); repeatable.",
    ),
    click.option(
        "--inputs", default=None, help="Comma-separated input runs searched after --output (default: all runs)."
    ),
]


def _apply(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


@main.command("run")
@_apply(_common)
@click.option("--cluster", default=None, help="Cluster profile (local, slurm, pbs, htcondor, lsf or a YAML path).")
@click.option("--scheduler", default=None, help="Address (tcp://host:port) or scheduler file of a running scheduler.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Workers (local) or jobs (batch profiles) to start."
)
@click.option(
    "--worker-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Give up when no worker has joined after this long (default: the profile's "
    "worker_timeout, else 60 for local and 300 for batch profiles and --scheduler).",
)
@click.option("--sync", is_flag=True, help="Run in this process without dask.distributed (debugging).")
@click.option("--resume", is_flag=True, help="Continue --output (it must exist); succeeded quanta are skipped.")
@click.option("--retry-failed", is_flag=True, help="Also rerun failed quanta (and their blocked descendants).")
@click.option("--retries", type=int, default=2, show_default=True, help="Retries after a transient failure.")
@click.option(
    "--max-in-flight", type=int, default=2000, show_default=True, help="Most quanta held by the scheduler at once."
)
@click.option(
    "--html", "html_path", type=click.Path(dir_okay=False), default=None, help="Write an HTML report here at the end."
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar per stage.")
def run_cmd(
    pipeline,
    repo,
    where,
    output,
    tasks,
    config,
    inputs,
    cluster,
    scheduler,
    workers,
    worker_timeout,
    sync,
    resume,
    retry_failed,
    retries,
    max_in_flight,
    html_path,
    progress,
):
    """Run PIPELINE (a packaged name such as drp/ap, or a YAML file) over REPO.

    Everything is checked before a cluster starts: the cluster profile (and the batch
    system's commands), the repository, the pipeline and its -c overrides, --tasks,
    --where, and the quanta of every task (e.g. that the sky map is registered).

    \b
    Examples:
      procsky run drp --repo R --where "tract=0" --output drp/run1
      procsky run drp --repo R --output drp/run1 --resume --retry-failed
      procsky run drp --repo R --output r2 --cluster slurm -c calibrate.detection.nsigma=4
      procsky run my.yaml --repo R --output r3 --cluster my-site.yaml --worker-timeout 900
    """
    from procsky.pipeline.clusters import check_profile, load_profile
    from procsky.pipeline.report import run_report, write_html
    from procsky.pipeline.run import plan_run

    if sync and (cluster or scheduler):
        raise click.UsageError("--sync runs without a cluster; drop --cluster/--scheduler.")
    if cluster and scheduler:
        raise click.UsageError("--scheduler uses a running scheduler; drop --cluster (or --scheduler).")
    # 1. The cluster profile: exists, parses, its package and batch commands are there.
    spec = None
    if not sync and not scheduler:
        overrides = {}
        if workers is not None:
            kind = load_profile(cluster or "local")["cluster"]
            overrides = {"n_workers": workers} if kind == "local" else {"jobs": workers}
        if worker_timeout is not None:
            overrides["worker_timeout"] = worker_timeout
        spec = check_profile(cluster or "local", **overrides)
    # 2. Repository, pipeline, overrides, --tasks, --where, and the quantum graph itself.
    plan = plan_run(
        repo,
        pipeline,
        where=where,
        output=output,
        config=list(config),
        tasks=_split(tasks),
        collections=_split(inputs),
        resume=True if resume else None,
    )
    for note in plan.warnings:
        click.echo(f"warning: {note}", err=True)
    # 3. Only now: a cluster, its first worker, then the stored graph and its execution.
    summary = _execute(
        plan,
        spec,
        scheduler,
        worker_timeout,
        sync,
        dict(retry_failed=retry_failed, retries=retries, max_in_flight=max_in_flight, progress=progress),
        resume_cmd=_resume_command(
            pipeline, repo, where, output, tasks, config, inputs, cluster, scheduler, workers, worker_timeout
        ),
    )
    click.echo(str(summary))
    if html_path:
        write_html(run_report(repo, output), html_path)
        click.echo(f"report: {html_path}")
    if not summary.ok:
        bad = sum(c.get("failed", 0) + c.get("blocked", 0) for c in summary.counts.values())
        click.echo(
            f"{bad} quanta failed or blocked; see `procsky report {repo} --run {output}`; "
            "fix and rerun with --retry-failed.",
            err=True,
        )
        sys.exit(1)


def _execute(plan, spec, scheduler, worker_timeout, sync, run_options, *, resume_cmd: str):
    """Start the cluster, wait for a worker, run; one line and exit 130 on Ctrl-C."""
    from procsky.pipeline.clusters import (
        DEFAULT_WORKER_TIMEOUT,
        connect,
        dashboard_status,
        mute_cluster,
        quiet_shutdown,
        wait_for_workers,
    )
    from procsky.pipeline.run import execute_plan

    client = cl = None
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_sigint(signum, frame):
            # Mute the workers before the executor cancels their tasks (each cancelled
            # task is a log line per worker), then interrupt as Python would.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            mute_cluster(client)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        if sync:
            return execute_plan(plan, client=None, **run_options)
        client, cl = connect(scheduler=scheduler, cluster=spec)
        link, hint = dashboard_status(client)
        click.echo(f"dask dashboard: {link}" if link else hint, err=True)
        if spec is None or spec.min_workers > 0:
            # An adaptive cluster with minimum 0 starts workers only once tasks arrive.
            timeout = worker_timeout or (spec.worker_timeout if spec else DEFAULT_WORKER_TIMEOUT["batch"])
            wait_for_workers(client, timeout, cluster=cl, spec=spec)
        return execute_plan(plan, client=client, **run_options)
    except KeyboardInterrupt:
        quiet_shutdown(client, cl)
        client = cl = None
        click.echo(_interrupted_line(plan, resume_cmd), err=True)
        sys.exit(130)
    finally:
        if client is not None or cl is not None:
            quiet_shutdown(client, cl)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _interrupted_line(plan, resume_cmd: str) -> str:
    graph = plan.graph
    if all(q.id is None for q in graph):  # interrupted before the graph was stored
        return f"Interrupted before any quantum ran; nothing was stored for run {graph.run!r}."
    counts = graph.counts()
    pending = sum(c.get("pending", 0) for c in counts.values())
    finished = sum(sum(c.values()) for c in counts.values()) - pending
    return f"Interrupted: {finished} quanta finished, {pending} pending; resume with `{resume_cmd}`"


def _resume_command(
    pipeline, repo, where, output, tasks, config, inputs, cluster, scheduler, workers, worker_timeout
) -> str:
    import shlex

    words = ["procsky", "run", pipeline, "--repo", repo]
    for flag, value in (
        ("--where", where),
        ("--output", output),
        ("--tasks", tasks),
        ("--inputs", inputs),
        ("--cluster", cluster),
        ("--scheduler", scheduler),
        ("--workers", workers),
        ("--worker-timeout", worker_timeout),
    ):
        if value is not None:
            words += [flag, str(value)]
    for item in config:
        words += ["-c", item]
    return shlex.join(words + ["--resume"])


@main.command("graph")
@_apply(_common)
@click.option("--format", "fmt", type=click.Choice(["json", "dot", "summary"]), default="summary", show_default=True)
@click.option("--save", is_flag=True, help="Store the graph in the registry (as `run` does).")
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
def graph_cmd(pipeline, repo, where, output, tasks, config, inputs, fmt, save, out):
    """Build and show the quantum graph of PIPELINE over REPO (no execution)."""
    from procsky.pipeline.run import make_graph

    graph = make_graph(
        repo,
        pipeline,
        where=where,
        output=output,
        config=list(config),
        tasks=_split(tasks),
        collections=_split(inputs),
        save=save,
    )
    if fmt == "json":
        text = graph.to_json()
    elif fmt == "dot":
        text = graph.to_dot()
    else:
        lines = [f"{len(graph)} quanta for run {output!r}"]
        for label, counts in graph.counts().items():
            parts = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
            lines.append(f"  {label}: {parts or 'no quanta'}")
        text = "\n".join(lines)
    if out:
        with open(out, "w") as fh:
            fh.write(text)
    else:
        click.echo(text)


@main.command("report")
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--run", "run", required=True, help="Output run of `procsky run`.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None, help="Also write HTML here.")
def report_cmd(repo, run, fmt, html_path):
    """Report on a pipeline run: states per task, failures, timings, memory, metrics.

    The JSON layout is documented in docs/report-json.md (schema "procsky.report/1").
    """
    from procsky.pipeline.report import format_table, run_report, write_html

    report = run_report(repo, run)
    if fmt == "json":
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(format_table(report))
    if html_path:
        write_html(report, html_path)
        click.echo(f"report: {html_path}", err=True)

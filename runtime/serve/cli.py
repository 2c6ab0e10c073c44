"""`gptedge serve BUNDLE [NAME=BUNDLE ...]`: start the OpenAI-compatible server and print where it listens."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
from pathlib import Path

from gptedge.errors import UsageError
from gptedge.runtime.cli import SPIN_HELP


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("bundle", nargs="+",
                        help="bundle folders to serve; a model's name is its folder name, or NAME=PATH")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens it to the network (set --api-key then)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("GPTEDGE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $GPTEDGE_API_KEY, else no key)")
    parser.add_argument("--parallel", type=int, default=4, help="sequences decoded together per model (KV rows)")
    parser.add_argument("--kv-budget-mb", type=float, default=None,
                        help="KV memory the parallel sequences of a model share, in MB (default: 1024)")
    parser.add_argument("--cache-ram-mb", type=float, default=None, metavar="MB",
                        help="RAM per model for the keys and values of recent prompts, so a request that starts like "
                             "an earlier one (a system prompt, a conversation) prefills only what is new, with the "
                             "same output as without; a request's 'cache_prompt': false skips it; 0 turns it off "
                             "(default: 256)")
    parser.add_argument("--prompt-cache", type=Path, default=None, metavar="DIR",
                        help="keep the stored prompts across restarts: read DIR/NAME.npz for each model at start "
                             "(refused if written by another bundle) and write it at shutdown")
    parser.add_argument("--queue", type=int, default=64, help="requests that may wait for a free row before 503s")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser pages from this origin (repeatable; default: none)")
    parser.add_argument("--max-body-mb", type=float, default=2.0, help="largest request body accepted (413 above)")
    parser.add_argument("--provider", default="auto", help="execution provider: auto, cpu, cuda or dml")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per operator (default: physical cores)")
    parser.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                        help=SPIN_HELP)


def parse_bundles(items: list[str]) -> list[tuple[str, Path]]:
    """NAME=PATH or PATH (named after its folder); names must be unique."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).resolve().name, item
        if not name or not path:
            raise UsageError(f"{item!r}: give a bundle folder, or NAME=PATH")
        folder = Path(path)
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a bundle folder; "
                             "pass the folder `gptedge export` or `gptedge quantize` wrote")
        if name in out:
            raise UsageError(f"two bundles are named {name!r}; name them apart with NAME=PATH")
        out[name] = folder
    return list(out.items())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a UsageError saying why not (port in use, bad address)."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                         "pick another --port or --host") from None
    return sock


def run(args: argparse.Namespace, command: str) -> int:
    import uvicorn  # a missing `serve` extra is reported by the dispatcher in one line

    from gptedge.runtime.batcher import DEFAULT_KV_BUDGET_MB
    from gptedge.runtime.model import DEFAULT_PREFIX_CACHE_MB
    from gptedge.runtime.serve.app import ServeConfig, ServerState, create_app

    bundles = parse_bundles(args.bundle)
    if args.parallel < 1:
        raise UsageError(f"--parallel must be >= 1, got {args.parallel}")
    if args.max_body_mb <= 0 or args.queue < 0:
        raise UsageError("--max-body-mb must be > 0 and --queue >= 0")
    config = ServeConfig(
        bundles=bundles, provider=args.provider, threads=args.threads, spin=args.spin, parallel=args.parallel,
        kv_budget_mb=DEFAULT_KV_BUDGET_MB if args.kv_budget_mb is None else args.kv_budget_mb, max_queue=args.queue,
        cache_ram_mb=DEFAULT_PREFIX_CACHE_MB if args.cache_ram_mb is None else args.cache_ram_mb,
        prompt_cache_dir=args.prompt_cache,
        api_key=args.api_key or None, cors_origins=args.cors_origin, max_body_bytes=int(args.max_body_mb * 2**20),
    )
    if not _is_loopback(args.host) and not config.api_key:
        print(f"gptedge serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "machine can use the models", file=sys.stderr)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    state = ServerState(config)
    server = uvicorn.Server(uvicorn.Config(create_app(config, state), log_level="warning", timeout_keep_alive=5,
                                           limit_concurrency=512))

    def announce() -> None:
        state.ready.wait()
        if state.error:
            print(f"gptedge serve: error: {state.error}", file=sys.stderr)
            server.should_exit = True
            return
        shown = f"[{host}]" if ":" in host else host
        for name, s in state.models.items():
            rows = f"{s.batcher.rows} x {s.capacity} positions" if s.batcher is not None else "embeddings"
            print(f"  {name}: {s.model.folder} on {s.model.provider}, {rows}", file=sys.stderr)
        print(f"gptedge serve: ready at http://{shown}:{port}/ (OpenAI API under /v1); Ctrl-C stops", file=sys.stderr)

    print(f"gptedge serve: loading {', '.join(n for n, _ in bundles)} ...", file=sys.stderr)
    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run(sockets=[sock])  # returns after a graceful shutdown: requests in flight end, batchers stop
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled
        pass
    if not state.error:
        print("gptedge serve: stopped", file=sys.stderr)
    return 2 if state.error else 0

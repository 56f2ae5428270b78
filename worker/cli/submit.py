"""The `headrace submit` verb: send one job to a running worker and print its result.

Prints the result text (token deltas as they arrive with --stream) on stdout,
or `error: CODE: message` on stderr with exit code 1 for error/cancelled results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from producer.client import REDIS_URL_ENV, AsyncClient
from worker.errors import RequestError
from worker.protocol import STATUS_OK, Result

NAMESPACE_ENV = "HEADRACE_NAMESPACE"
# A job that Redis lost (a restart without persistence) never gets a result: never wait forever.
DEFAULT_TIMEOUT_S = 600.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit", help="submit one job to the workers and print its result", description=__doc__
    )
    parser.add_argument("text", nargs="?", help="the prompt (raw text, no chat template)")
    parser.add_argument(
        "--messages-file",
        type=Path,
        help='JSON list of {"role", "content"} chat messages (the chat template applies); - = stdin',
    )
    parser.add_argument("--stream", action="store_true", help="print token deltas as they arrive")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV),
        help=f"the workers' Redis (default ${REDIS_URL_ENV}; `headrace worker` prints it)",
    )
    parser.add_argument("--namespace", default=os.environ.get(NAMESPACE_ENV, "headrace"))
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--priority",
        type=int,
        default=0,
        help="higher runs first: > 0 goes to the high stream, < 0 to the low one (default 0)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the result, then cancel the job and exit 1 (default "
        f"{DEFAULT_TIMEOUT_S:.0f}; 0 = no limit)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.redis_url:
        print(
            f"error: no Redis: pass --redis-url or set ${REDIS_URL_ENV} "
            "(a worker without one prints the URL of its embedded Redis)",
            file=sys.stderr,
        )
        return 2
    try:
        job = _job_fields(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_submit(args, job))
    except RequestError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.status != STATUS_OK:
        error = result.error or {"code": result.status, "message": result.finish_reason or ""}
        print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    return 0


def _job_fields(args: argparse.Namespace) -> dict[str, Any]:
    if (args.text is None) == (args.messages_file is None):
        raise ValueError("give either a prompt text or --messages-file")
    params = {
        name: value
        for name, value in (
            ("max_tokens", args.max_tokens),
            ("temperature", args.temperature),
            ("seed", args.seed),
        )
        if value is not None
    }
    job: dict[str, Any] = {"params": params, "stream": args.stream, "priority": args.priority}
    if args.text is not None:
        job["prompt"] = args.text
    else:
        raw = sys.stdin.read() if str(args.messages_file) == "-" else args.messages_file.read_text()
        messages = json.loads(raw)
        if not isinstance(messages, list):
            raise ValueError("--messages-file must hold a JSON list of messages")
        job["messages"] = messages
    return job


async def _submit(args: argparse.Namespace, job: dict[str, Any]) -> Result:
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    async with AsyncClient(args.redis_url, args.namespace, reply_ttl_s=60) as client:
        job_id = (await client.submit_many([job]))[0]
        try:
            if not args.stream:
                result = await client.result(job_id, timeout)
                if result.text is not None:
                    print(result.text, flush=True)
                return result
            return await _print_stream(client, job_id, timeout)
        except (asyncio.CancelledError, KeyboardInterrupt, TimeoutError):
            await asyncio.shield(client.cancel(job_id))  # nobody will read it: free the worker
            raise


async def _print_stream(client: AsyncClient, job_id: str, timeout: float | None) -> Result:
    attempt = None
    async for item in client.stream(job_id, timeout):
        if attempt is not None and item.attempt not in (None, attempt):
            # A worker died and the job restarted: its deltas start over.
            print("\n[job restarted on another worker]", file=sys.stderr, flush=True)
        attempt = item.attempt if item.attempt is not None else attempt
        if item.delta:
            print(item.delta, end="", flush=True)
        if item.final:
            print(flush=True)
            return item
    raise RuntimeError("stream ended without a final result")  # pragma: no cover

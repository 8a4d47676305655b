"""GET /health of the HTTP API under 100 concurrent clients, against a bare FastAPI endpoint in the same run.

Each server is uvicorn on 127.0.0.1 in its own process (the API on the local
backend over a fresh data dir; the bare app returns a constant); the load is
aiohttp clients in this process, each sending its requests one after another
over a keep-alive connection. Rounds alternate between the two servers so
that both see the same machine load. Goal: API p99 <= 2x the bare p99.

    .venv/bin/python bench/bench_api_health.py [--clients 100] [--requests 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

LOOPBACK = "127.0.0.1"


def serve(which: str, port: int, data_dir: str) -> None:
    import uvicorn
    from fastapi import FastAPI

    if which == "bare":
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}
    else:
        from bot.api import api_for_settings
        from bot.settings import Settings

        app = api_for_settings(Settings.load(environ={"TOOLBOX_DATA_DIR": data_dir}), token="bench-token")
    uvicorn.run(app, host=LOOPBACK, port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


async def wait_until_up(url: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def hammer(url: str, clients: int, requests: int) -> list[float]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            for _ in range(requests):
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace, urls: dict[str, str]) -> None:
    for url in urls.values():
        await wait_until_up(url)
        await hammer(url, args.clients, 5)  # warm-up: connections, imports, the first health document
    samples: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(args.rounds):
        for name, url in urls.items():
            samples[name] += await hammer(url, args.clients, args.requests)
    for name, latencies in samples.items():
        print(f"{name:5} n={len(latencies)}  p50 {statistics.median(latencies) * 1000:7.2f} ms  "
              f"p99 {percentile(latencies, 0.99) * 1000:7.2f} ms")
    ratio = percentile(samples["api"], 0.99) / percentile(samples["bare"], 0.99)
    print(f"p99 api / bare: {ratio:.2f}x (goal <= 2x): {'ok' if ratio <= 2 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=40, help="per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        servers, urls = [], {}
        for name in ("bare", "api"):
            port = free_port()
            process = multiprocessing.Process(target=serve, args=(name, port, data_dir), daemon=True)
            process.start()
            servers.append(process)
            urls[name] = f"http://{LOOPBACK}:{port}/health"
        try:
            asyncio.run(run(args, urls))
        finally:
            for process in servers:
                process.terminate()
                process.join(timeout=10)


if __name__ == "__main__":
    main()

"""Download throughput and memory: `python bench/bench_download.py [--size-mb 2048] [--runs 3]`.

A fake hub on 127.0.0.1 generates the file's bytes on the fly (nothing of
that size is held in memory). Each client runs in its own process so that
its peak RSS (`wait4`'s ru_maxrss) is its own:

- raw: http.client reading the same URL into a file, 1 MiB at a time, no
  checks at all (the loopback ceiling);
- download_file: our primitive (streaming, sha256, size check, rename);
- hf_hub_download: the Hugging Face path the engine uses for base models.

Goals: download_file ≥ 0.9x raw; peak RSS < 200 MB while downloading 2 GB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.hf_server import FakeHub, GeneratedBlob  # noqa: E402

REPO = "bench/model"
NAME = "weights.safetensors"


def client(mode: str, url: str, dest: Path, sha256: str, size: int) -> None:
    """One download in this (child) process; prints the seconds it took (imports not counted)."""
    import http.client
    from urllib.parse import urlsplit

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub import hf_hub_download

    from modal_services.transfer import download_file

    started = time.perf_counter()
    if mode == "raw":
        parts = urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port)
        connection.request("GET", parts.path)
        response = connection.getresponse()
        with open(dest, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    elif mode == "download_file":
        result = download_file(url, dest, expected_size=size, expected_sha256=sha256)
        assert result.sha256 == sha256
    elif mode == "hf":
        hf_hub_download(REPO, NAME, local_dir=dest.parent, endpoint=url.split("/files/")[0])
    print(time.perf_counter() - started)


def run_child(mode: str, url: str, dest: Path, blob: GeneratedBlob) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one client process."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--client", mode, url, str(dest), blob.sha256, str(blob.size)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    _, status, usage = os.wait4(process.pid, 0)
    output = process.stdout.read()
    process.stdout.close()
    if status != 0:
        raise SystemExit(f"{mode} client failed (status {status})")
    dest.unlink(missing_ok=True)
    return float(output.strip().splitlines()[-1]), usage.ru_maxrss / 1024  # ru_maxrss is KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    blob = GeneratedBlob(args.size_mb * (1 << 20))
    with FakeHub() as hub, tempfile.TemporaryDirectory() as tmp:
        hub.add_plain(NAME, blob)
        hub.add_file(REPO, NAME, blob)
        url = f"{hub.url}/files/{NAME}"
        results: dict[str, list[tuple[float, float]]] = {"raw": [], "download_file": [], "hf": []}
        for _ in range(args.runs):  # interleaved, so drift in the machine hits every mode alike
            for mode in results:
                results[mode].append(run_child(mode, url, Path(tmp) / NAME, blob))
        print(f"file: {blob.size / 2**20:.0f} MiB over loopback, {args.runs} runs each (median)")
        raw = statistics.median(seconds for seconds, _ in results["raw"])
        for mode, runs in results.items():
            seconds = statistics.median(s for s, _ in runs)
            peak = max(rss for _, rss in runs)
            print(f"{mode:14} {blob.size / seconds / 1e6:8.0f} MB/s  {raw / seconds:5.2f}x raw  peak RSS {peak:6.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        mode, url, dest, sha256, size = sys.argv[2:7]
        client(mode, url, Path(dest), sha256, int(size))
    else:
        main()

"""Download throughput and memory.

`python bench/bench_download.py [--size-mb 2048] [--runs 3]`: a fake hub on
127.0.0.1 generates the file's bytes on the fly (nothing of that size is held
in memory). Each client runs in its own process so that its peak RSS
(`wait4`'s ru_maxrss) is its own:

- raw: http.client reading the same URL into a file, 1 MiB at a time, no
  checks at all (the loopback ceiling);
- download_file: our primitive (streaming, sha256, size check, rename; a
  large file over parallel ranges);
- hf_hub_download: the Hugging Face path the engine uses for base models.

Goals: download_file ≥ 0.9x raw; peak RSS < 200 MB while downloading 2 GB.

`python bench/bench_download.py --paced [--size-mb 500] [--runs 3]`: the hub
paces each connection at 20 MB/s (as CivitAI's storage nodes do), and compares
download_file over 4 ranges, download_file over one connection
(TOOLBOX_DOWNLOAD_CONNECTIONS=1) and `aria2c -x4 -s4`, all checking the
sha256. aria2 is installed here with apt-get when it is missing (and skipped,
saying so, when it cannot be). Goals: ≥ 1.0x aria2c, ≥ 3x one connection.
"""

from __future__ import annotations

import argparse
import os
import shutil
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

    from modal_services.net.transfer.download import download_file

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
    elif mode == "aria2c":
        subprocess.run(
            ["aria2c", "-x4", "-s4", f"--checksum=sha-256={sha256}", "--allow-overwrite=true",
             "--auto-file-renaming=false", "--console-log-level=warn", "--summary-interval=0",
             "-d", str(dest.parent), "-o", dest.name, url], check=True, stdout=subprocess.DEVNULL)
    print(time.perf_counter() - started)


def run_child(mode: str, url: str, dest: Path, blob: GeneratedBlob, connections: int = 4) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one client process."""
    env = {**os.environ, "TOOLBOX_DOWNLOAD_CONNECTIONS": str(connections)}
    process = subprocess.Popen(
        [sys.executable, __file__, "--client", mode, url, str(dest), blob.sha256, str(blob.size)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )
    _, status, usage = os.wait4(process.pid, 0)
    output = process.stdout.read()
    process.stdout.close()
    if status != 0:
        raise SystemExit(f"{mode} client failed (status {status})")
    dest.unlink(missing_ok=True)
    return float(output.strip().splitlines()[-1]), usage.ru_maxrss / 1024  # ru_maxrss is KB on Linux


PACE = 20e6  # bytes per second per connection, for --paced


def aria2c_available() -> bool:
    """The bench's own setup step: aria2 from apt when it is missing and we may install it."""
    if shutil.which("aria2c"):
        return True
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("installing aria2 (apt-get)…", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "aria2"], check=False, stdout=subprocess.DEVNULL)
    return shutil.which("aria2c") is not None


def paced(blob: GeneratedBlob, runs: int) -> None:
    modes = {"parallel (4)": ("download_file", 4), "one connection": ("download_file", 1)}
    if aria2c_available():
        modes["aria2c -x4 -s4"] = ("aria2c", 4)
    else:
        print("aria2c is not installed and could not be: skipping that comparison")
    with FakeHub() as hub, tempfile.TemporaryDirectory() as tmp:
        hub.pace = PACE
        hub.add_plain(NAME, blob)
        url = f"{hub.url}/files/{NAME}"
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
        for _ in range(runs):
            for name, (mode, connections) in modes.items():
                results[name].append(run_child(mode, url, Path(tmp) / NAME, blob, connections))
    print(f"file: {blob.size / 2**20:.0f} MiB, each connection paced at {PACE / 1e6:.0f} MB/s, sha256 checked, "
          f"{runs} runs each (median)")
    medians = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
    for name, seconds in medians.items():
        ratios = [f"{medians[other] / seconds:5.2f}x {other}" for other in medians if other != name]
        peak = max(rss for _, rss in results[name])
        print(f"{name:16} {blob.size / seconds / 1e6:7.1f} MB/s  peak RSS {peak:5.0f} MB  " + "  ".join(ratios))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=None, help="2048, or 500 with --paced")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--paced", action="store_true", help="parallel ranges against per-connection pacing")
    args = parser.parse_args()
    # The fake hub listens on 127.0.0.1: allowed explicitly, as a LAN host would be.
    os.environ.setdefault("TOOLBOX_ALLOWED_HOSTS", "127.0.0.1")
    if args.paced:
        paced(GeneratedBlob((args.size_mb or 500) * (1 << 20)), args.runs)
        return

    blob = GeneratedBlob((args.size_mb or 2048) * (1 << 20))
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

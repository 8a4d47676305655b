"""The migration of an older toolbox's LoRA volume holding one large checkpoint without a sha256.

Goals: the file is moved, not copied (same inode afterwards); its sha256 is streamed (peak memory
stays far below the file's size); the run takes about as long as hashing the file once.

    .venv/bin/python bench/bench_migration.py [--gib 2]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modal_services.layout import Layout  # noqa: E402
from modal_services.library.migration import Migration  # noqa: E402
from modal_services.library.migration_report import render_report  # noqa: E402
from modal_services.state.store import SqliteStore  # noqa: E402

SDXL_KEY = "model.diffusion_model.label_emb.0.0.weight"


def write_checkpoint(path: Path, size: int) -> None:
    """A safetensors file whose one tensor (SDXL's size-conditioning key) fills `size` bytes of random data."""
    header = json.dumps({SDXL_KEY: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    block = os.urandom(1 << 24)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        for offset in range(0, size, len(block)):
            out.write(block[: min(len(block), size - offset)])


def hash_once(path: Path) -> float:
    started = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    args = parser.parse_args()
    size = int(args.gib * 2**30)

    with tempfile.TemporaryDirectory(prefix="bench-migration-") as scratch:
        data = Path(scratch)
        loras = data / "loras"
        loras.mkdir()
        old = loras / "big_checkpoint.safetensors"
        write_checkpoint(old, size)
        (loras / ".metadata.json").write_text(json.dumps({"models": {old.name: {"type": "checkpoint", "display_name": "Big"}}}))
        inode = old.stat().st_ino
        raw = hash_once(old)  # also warms the page cache, as the migration will find it

        async def run():
            store = SqliteStore(data / "state.sqlite3")
            try:
                return await Migration(Layout(data / "models", loras, store)).run()
            finally:
                await store.close()

        # The importer's checkpoint check loads torch (for safetensors' "pt" framework): imported first,
        # so that the figures are the migration's own, not the import of a library.
        import safetensors.torch  # noqa: F401

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        report = asyncio.run(run())
        took = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        moved = loras / "checkpoints" / old.name
        print(render_report(report))
        print(f"{args.gib:g} GiB checkpoint: migration {took:.2f} s, one sha256 pass {raw:.2f} s "
              f"({took / raw:.2f}x; goal about 1x)")
        print(f"moved, not copied (same inode): {moved.stat().st_ino == inode}")
        print(f"peak RSS {peak / 1024:.0f} MiB (before the run {rss_before / 1024:.0f} MiB; file {size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()

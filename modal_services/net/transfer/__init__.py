"""The HTTP transfer primitive: the one place that moves a file's bytes.

`download.download_file` is blocking (worker threads call it): bounded-memory
streaming into `<dest>.partial`, resume with `Range`, retries with backoff,
size and sha256 checks, then an atomic rename. Nothing half-written is ever
left under the final name. Every request goes through the egress policy.

Every transfer ends: a stall rule (`TOOLBOX_STALL_SECONDS`), a per-file
deadline, one retry budget for every kind of failure, size caps, and the
caller's progress callback (which raises on Cancel) checked between reads and
by a watch thread that cuts a blocked read (`deadlines`, `retries`). A file
comes over one connection (`single`) or, when large and the server serves
byte ranges, over several (`parallel`).
"""

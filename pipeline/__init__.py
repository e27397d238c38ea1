"""Batch audience exchange between Adobe Audience Manager and Adobe Campaign."""

import os

# Polars' jemalloc keeps freed pages as "dirty" (500 ms) then "muzzy" (MADV_FREE, 1 s): muzzy
# pages stay in RSS until the kernel feels memory pressure, and with three threads allocating
# at once (read-ahead, resolve, snapshot index) RSS grew with input size: 30M lines peaked at
# 1.6-1.8 GB against 1.3 GB at 10M although live data did not grow. Measured on 30M lines:
# dirty 2 s then straight back to the OS (no muzzy stage) holds the peak at ~1.4 GB for the
# same speed. Polars appends this to its defaults when it loads (later keys win); a value
# already set wins over ours.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:2000,muzzy_decay_ms:0")

"""L3 bench: checksum and codec speed, connector vs raw client, end-to-end put+get.

    python bench/l3.py [--quick] [--out bench/results/l3.json]

In one run, on real servers this script starts on 127.0.0.1 (the test
helpers in tests/connectors/l3_servers.py):
  1. checksum: XXH3-64 (the frame checksum) GB/s per core, with alternatives;
  2. codecs: ratio and encode/decode GB/s per core for every codec on KV pages
     produced by the reference decoder, channel-scaled random bf16, plain
     random bf16 (the worst case for bf16) and random bytes;
  3. throughput: batch put/get of each backend vs the raw client doing the same
     work (redis-py pipelined MSET/MGET of the same bytes, raw
     MooncakeDistributedStore batch calls), Llama-3-8B-like pages of 16 and 64
     tokens (2 and 8 MiB), batch sizes 1/32/256, codec none;
  4. end to end: put+get time of a batch over each backend with each codec,
     on Llama-sized pages made of decoder KV; the fastest codec per backend is
     reported as its measured default;
  5. disk vs SGLang: the disk store's get_into (checksum included) and put
     against SGLang's file backend (HiCacheFile batch_get / batch_set), the same
     32 pages of 2 MiB in the page cache, reps alternating. SGLang runs in the
     interpreter given by --sglang-python (or $KVSTORE_SGLANG_PYTHON); the
     section is skipped, with the reason, where it cannot import SGLang.
     `--disk-vs-sglang-only` runs just this section (into l3_disk_vs_sglang.json).
Timings are wall clock on whatever machine runs it; label it with --machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "connectors")]

import l3_servers  # noqa: E402

from connectors import codec as C  # noqa: E402
from connectors import open_connector  # noqa: E402

# Llama-3-8B: 32 layers x (K, V) x 8 kv heads x 128 dims x bf16 = 128 KiB per token
LLAMA3_8B_TOKEN_BYTES = 32 * 2 * 8 * 128 * 2
CODEC_NAMES = ["none", "lz4", "shuffle_lz4", "zstd", "shuffle_zstd"]
GB = 1e9


# ---------------------------------------------------------------- data
def bf16_pages(n: int, page_bytes: int, seed: int, channel_scaled: bool) -> list[bytes]:
    """bf16 normals; channel_scaled multiplies each of 128 channels by its own scale."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(page_bytes // 2, dtype=np.float32)
        if channel_scaled:
            x *= np.resize(rng.uniform(0.05, 8.0, 128).astype(np.float32), x.size)
        out.append((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return out


def decoder_pages(num_tokens: int) -> tuple[list[bytes], dict]:
    """KV pages the reference decoder writes for a random prompt (bf16, 16-token pages)."""
    import torch
    from decoder.config import DecoderConfig
    from decoder.engine import ReferenceEngine
    from decoder.model import ReferenceDecoder

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = DecoderConfig.preset("small")
    layout = cfg.kv_layout(16, dtype="bfloat16", arrangement="page_first")
    engine = ReferenceEngine(ReferenceDecoder(cfg), layout, num_tokens // 16 + 1)
    prompt = np.random.default_rng(7).integers(0, cfg.vocab_size, num_tokens)
    t0 = time.perf_counter()
    engine.generate(prompt, 1)
    pool = engine.kv_pool[: num_tokens // 16].contiguous()
    pages = [bytes(p.view(torch.uint8).numpy().tobytes()) for p in pool]
    info = {"preset": "small", "layers": cfg.num_layers, "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "page_tokens": 16, "dtype": "bfloat16",
            "num_pages": len(pages), "page_bytes": len(pages[0]),
            "prefill_s": round(time.perf_counter() - t0, 1)}
    return pages, info


# ---------------------------------------------------------------- 1, 2
def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_checksums(reps: int) -> dict:
    buf = os.urandom(8 << 20)
    import xxhash  # a dependency: the frame checksum

    algos = {
        "xxh3_64 (used)": xxhash.xxh3_64_intdigest,
        "crc32 (zlib)": zlib.crc32,
        "adler32 (zlib)": zlib.adler32,
        "blake2b-64": lambda b: hashlib.blake2b(b, digest_size=8).digest(),
    }
    return {name: round(len(buf) / best_time(lambda f=f: f(buf), reps) / GB, 2)
            for name, f in algos.items()} | {"buffer_bytes": len(buf), "zlib": zlib.ZLIB_RUNTIME_VERSION}


def bench_codecs(datasets: dict[str, list[bytes]], reps: int) -> dict:
    """Per data set and codec: ratio (raw/stored incl. header), encode/decode GB/s, one thread."""
    fp = C.fingerprint_digest("bench")
    out = {}
    for name, pages in datasets.items():
        raw = sum(map(len, pages))
        out[name] = {"raw_bytes": raw, "pages": len(pages)}
        for codec in CODEC_NAMES:
            cid = C.CODECS[codec]
            frames = [C.encode_frame(p, cid, fp, 2) for p in pages]
            bufs = [memoryview(bytearray(len(p))) for p in pages]
            enc = best_time(lambda: [C.encode_frame(p, cid, fp, 2) for p in pages], reps)
            dec = best_time(lambda: [C.decode_into(f, b, fp, 1 << 30) for f, b in zip(frames, bufs)], reps)
            assert [bytes(b) for b in bufs] == pages
            out[name][codec] = {"ratio": round(raw / sum(map(len, frames)), 3),
                                "encode_GBps": round(raw / enc / GB, 3),
                                "decode_GBps": round(raw / dec / GB, 3)}
        print(f"codecs {name}: " + ", ".join(
            f"{c} {out[name][c]['ratio']}x {out[name][c]['encode_GBps']}/{out[name][c]['decode_GBps']} GB/s"
            for c in CODEC_NAMES), flush=True)
    return out


# ---------------------------------------------------------------- servers
@contextlib.contextmanager
def servers(segment_bytes: int):
    """Start every store; yields {backend: options} (a backend that cannot start
    is left out and its reason kept under "_skipped")."""
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="l3bench-") as tmp:
        opts: dict = {"memory": {}, "disk": {"path": os.path.join(tmp, "disk"),
                                              "capacity_bytes": 8 << 30}, "_skipped": {}}
        starters = {
            "redis": (l3_servers.redis_server_or_skip, lambda s: {"host": "127.0.0.1", "port": s.port}),
            "redis_cluster": (l3_servers.redis_cluster_or_skip,
                              lambda c: {"startup_nodes": c.startup_nodes}),
            "mooncake": (lambda: l3_servers.mooncake_or_skip(segment_bytes),
                         lambda m: {**m.client_options(), "local_buffer_size": 1 << 30}),
        }
        for name, (start, options) in starters.items():
            try:
                opts[name] = options(stack.enter_context(start()))
            except BaseException as exc:   # pytest's Skipped is a BaseException
                if isinstance(exc, KeyboardInterrupt):
                    raise
                opts["_skipped"][name] = f"{type(exc).__name__}: {exc}"
        yield opts


# ---------------------------------------------------------------- raw clients
class RawRedis:
    """redis-py doing the same work: pipelined MSET/MGET of the same bytes, in
    chunks of `chunk` keys (the connector's sub-batch size)."""

    def __init__(self, options: dict, chunk: int) -> None:
        import redis.asyncio as aioredis
        self.r = aioredis.Redis(host=options["host"], port=options["port"])
        self.chunk = chunk

    async def put(self, keys, values) -> None:
        async with self.r.pipeline(transaction=False) as pipe:
            for lo in range(0, len(keys), self.chunk):
                pipe.mset(dict(zip(keys[lo:lo + self.chunk], values[lo:lo + self.chunk])))
            await pipe.execute()

    async def get(self, keys) -> list:
        async with self.r.pipeline(transaction=False) as pipe:
            for lo in range(0, len(keys), self.chunk):
                pipe.mget(keys[lo:lo + self.chunk])
            return [v for chunk in await pipe.execute() for v in chunk]

    async def delete(self, keys) -> None:
        await self.r.delete(*keys)

    async def close(self) -> None:
        await self.r.aclose()


class RawRedisCluster:
    """redis-py's RedisCluster doing the same work: one ClusterPipeline of
    SET/GET per call (redis-py groups it per node), the same bytes."""

    def __init__(self, options: dict, chunk: int) -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        self.r = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in options["startup_nodes"]])

    async def put(self, keys, values) -> None:
        async with self.r.pipeline() as pipe:
            for k, v in zip(keys, values):
                pipe.set(k, v)
            await pipe.execute()

    async def get(self, keys) -> list:
        async with self.r.pipeline() as pipe:
            for k in keys:
                pipe.get(k)
            return await pipe.execute()

    async def delete(self, keys) -> None:
        async with self.r.pipeline() as pipe:
            for k in keys:
                pipe.delete(k)
            await pipe.execute()

    async def close(self) -> None:
        await self.r.aclose()


class RawMooncake:
    """MooncakeDistributedStore batch calls (upsert_batch, batch_get_buffer) in
    chunks, on a worker thread as any asyncio caller would."""

    def __init__(self, options: dict, chunk: int) -> None:
        from mooncake.store import MooncakeDistributedStore
        self.s = MooncakeDistributedStore()
        rc = self.s.setup("127.0.0.1", "P2PHANDSHAKE", 0, options["local_buffer_size"], "tcp", "",
                          options["master_addr"])
        if rc != 0:
            raise RuntimeError(f"mooncake setup failed: {rc}")
        self.chunk = chunk

    def _put(self, keys, values) -> None:
        for lo in range(0, len(keys), self.chunk):
            rc = self.s.upsert_batch(keys[lo:lo + self.chunk], values[lo:lo + self.chunk])
            if rc != 0:
                raise RuntimeError(f"upsert_batch: {rc}")

    def _get(self, keys) -> list:
        out = []
        for lo in range(0, len(keys), self.chunk):
            handles = self.s.batch_get_buffer(keys[lo:lo + self.chunk])
            out += [h.size() if h is not None else 0 for h in handles]   # handles freed here
        return out

    async def put(self, keys, values) -> None:
        await asyncio.to_thread(self._put, [k.hex() for k in keys], values)

    async def get(self, keys) -> list:
        return await asyncio.to_thread(self._get, [k.hex() for k in keys])

    async def delete(self, keys) -> None:
        await asyncio.to_thread(self.s.batch_remove, [k.hex() for k in keys], True)

    async def close(self) -> None:
        await asyncio.to_thread(self.s.close)


RAW_CLIENTS = {"redis": RawRedis, "redis_cluster": RawRedisCluster, "mooncake": RawMooncake}


# ---------------------------------------------------------------- 3, 4
def reps_for(batch_bytes: int, quick: bool) -> int:
    if batch_bytes <= 8 << 20:
        return 5 if quick else 30
    if batch_bytes <= 64 << 20:
        return 3 if quick else 7
    return 1 if quick else 3


async def time_connector(conn, pages: list[bytes], reps: int) -> tuple[float, float]:
    """Best put and get_into times of one batch (fresh keys each rep, deleted after)."""
    bufs = [memoryview(bytearray(len(p))) for p in pages]
    best_put = best_get = float("inf")
    for _ in range(reps):
        keys = [os.urandom(16) for _ in pages]
        t0 = time.perf_counter()
        stored = await conn.put(keys, pages)
        t1 = time.perf_counter()
        got = await conn.get_into(keys, bufs)
        t2 = time.perf_counter()
        if not all(stored) or not all(got):
            raise RuntimeError(f"{type(conn).__name__}: {stored.count(False)} puts, "
                               f"{got.count(False)} gets failed: {conn.stats()}")
        best_put, best_get = min(best_put, t1 - t0), min(best_get, t2 - t1)
        await conn.delete(keys)
    if any(b != p for b, p in zip(bufs[:2], pages[:2])):
        raise RuntimeError("read back differs")
    return best_put, best_get


async def time_raw(raw, pages: list[bytes], reps: int) -> tuple[float, float]:
    best_put = best_get = float("inf")
    for _ in range(reps):
        keys = [os.urandom(16) for _ in pages]
        t0 = time.perf_counter()
        await raw.put(keys, pages)
        t1 = time.perf_counter()
        got = await raw.get(keys)
        t2 = time.perf_counter()
        if len(got) != len(pages) or not all(got):
            raise RuntimeError(f"raw {type(raw).__name__}: missing values")
        best_put, best_get = min(best_put, t1 - t0), min(best_get, t2 - t1)
        await raw.delete(keys)
        del got
    return best_put, best_get


def distinct_pages(page: bytes, batch: int) -> list[memoryview]:
    """batch pages with the bytes of `page`, each in its own memory: sending one
    object `batch` times would keep it in the CPU cache and flatter the client."""
    blob = bytearray(page * batch)
    for i in range(batch):     # and make them differ
        blob[i * len(page)] ^= i & 0xFF
    return [memoryview(blob)[i * len(page):(i + 1) * len(page)] for i in range(batch)]


def _gbps(num_bytes: int, seconds: float) -> float:
    return round(num_bytes / seconds / GB, 3)


async def _interleaved(backend: str, options: dict, pages: list[bytes], reps: int):
    """Best (put_s, get_s) of the connector (codec none) and of the raw client,
    alternating one rep of each so that load from elsewhere hits both alike."""
    conn = open_connector(backend, codec="none", **options)
    raw = RAW_CLIENTS[backend](options, conn._max_keys) if backend in RAW_CLIENTS else None
    ours = theirs = (float("inf"), float("inf"))
    try:
        for _ in range(reps):
            if raw is not None:
                theirs = tuple(map(min, theirs, await time_raw(raw, pages, 1)))
            ours = tuple(map(min, ours, await time_connector(conn, pages, 1)))
    finally:
        await conn.close()
        if raw is not None:
            await raw.close()
    return ours, (theirs if raw is not None else None)


async def bench_throughput(opts: dict, quick: bool, max_batch_bytes: int) -> list[dict]:
    rows = []
    tokens_list = [16] if quick else [16, 64]
    batches = [1, 32] if quick else [1, 32, 256]
    for backend in [b for b in opts if not b.startswith("_")]:
        for tokens in tokens_list:
            page = bf16_pages(1, tokens * LLAMA3_8B_TOKEN_BYTES, tokens, True)[0]
            for batch in batches:
                nbytes = batch * len(page)
                if nbytes > max_batch_bytes:
                    rows.append({"backend": backend, "page_tokens": tokens, "batch": batch,
                                 "skipped": f"{nbytes >> 20} MiB per batch > --max-batch-bytes: with the "
                                            "raw client's own copies it ran this 23 GB box out of memory"})
                    continue
                pages = distinct_pages(page, batch)
                reps = reps_for(nbytes, quick)
                ours, raw = await _interleaved(backend, opts[backend], pages, reps)
                row = {"backend": backend, "page_tokens": tokens, "page_bytes": len(page),
                       "batch": batch, "reps": reps,
                       "put_GBps": _gbps(nbytes, ours[0]), "get_GBps": _gbps(nbytes, ours[1])}
                if raw is not None:
                    (rput_s, rget_s), (put_s, get_s) = raw, ours
                    row |= {"raw_put_GBps": _gbps(nbytes, rput_s), "raw_get_GBps": _gbps(nbytes, rget_s),
                            "put_vs_raw": round(rput_s / put_s, 3), "get_vs_raw": round(rget_s / get_s, 3),
                            "put_get_vs_raw": round((rput_s + rget_s) / (put_s + get_s), 3)}
                print("throughput", row, flush=True)
                rows.append(row)
                gc.collect()
    return rows


def own_store(backend: str, options: dict, tag: str) -> dict:
    """Options for one more connector on a backend: a disk store owns its
    directory (one connector at a time), so each gets a sibling of its own."""
    return {**options, "path": f"{options['path']}-{tag}"} if backend == "disk" else options


async def bench_end_to_end(opts: dict, pages: list[bytes], reps: int) -> dict:
    """put+get_into of one batch over each backend with each codec, the codecs
    taking turns within each rep; the fastest (best of reps) is the default."""
    nbytes = sum(map(len, pages))
    out: dict = {"batch": len(pages), "page_bytes": len(pages[0]), "reps": reps, "backends": {}}
    for backend in [b for b in opts if not b.startswith("_")]:
        conns = {c: open_connector(backend, codec=c, **own_store(backend, opts[backend], c))
                 for c in CODEC_NAMES}
        best = {c: (float("inf"), float("inf")) for c in CODEC_NAMES}
        try:
            for _ in range(reps):
                for codec, conn in conns.items():
                    best[codec] = tuple(map(min, best[codec], await time_connector(conn, pages, 1)))
        finally:
            for conn in conns.values():
                await conn.close()
        times = {c: {"put_ms": round(p * 1e3, 1), "get_ms": round(g * 1e3, 1),
                     "put_get_ms": round((p + g) * 1e3, 1), "put_get_GBps": _gbps(2 * nbytes, p + g)}
                 for c, (p, g) in best.items()}
        fastest = min(times, key=lambda c: times[c]["put_get_ms"])
        out["backends"][backend] = {"codecs": times, "fastest": fastest}
        print("end to end", backend, fastest, times, flush=True)
    return out


# ---------------------------------------------------------------- 5
# SGLang's side runs in its own interpreter (its venv has torch and sglang;
# ours need not): a worker that sets up HiCacheFile as SGLang's server does for
# one TP rank with default file-backend options, stores the pages, then
# answers one command a line with one timing: "get" (batch_get of every page
# into host-pool slots), "set" (batch_set of the pages under fresh keys, whose
# files it then removes, untimed), "check" (slots == pages).
_SGLANG_WORKER = r"""
import json, os, sys, time, uuid
import torch
import sglang
from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig

blob, store_dir, num_pages, page_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                              attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                              is_page_first_layout=True, model_name="meta-llama/Llama-3.1-8B")
store = HiCacheFile(config, file_path=store_dir)
with open(blob, "rb") as f:
    pages = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).view(num_pages, page_bytes)
slots = torch.zeros(num_pages, page_bytes, dtype=torch.uint8)
new_keys = lambda: [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(num_pages)]  # like page hashes
keys = new_keys()
assert store.batch_set(keys, list(pages))
print(json.dumps({"ready": True, "sglang": sglang.__version__}), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "get":
        t0 = time.perf_counter()
        got = store.batch_get(keys, list(slots))
        reply = {"s": time.perf_counter() - t0, "ok": all(g is not None for g in got)}
    elif cmd == "set":
        fresh = new_keys()
        t0 = time.perf_counter()
        ok = store.batch_set(fresh, list(pages))
        reply = {"s": time.perf_counter() - t0, "ok": ok}
        for k in fresh:
            os.remove(os.path.join(store_dir, store._get_suffixed_key(k) + ".bin"))
    elif cmd == "check":
        reply = {"ok": bool(torch.equal(slots, pages))}
    else:
        break
    print(json.dumps(reply), flush=True)
"""


class SGLangFilePeer:
    """The worker above: `start()` it (RuntimeError, with the worker's last
    words, when it cannot), `ask(cmd)` -> its reply; a context manager."""

    def __init__(self, python: str, blob: str, store_dir: str, num_pages: int, page_bytes: int) -> None:
        self.args = [python, "-c", _SGLANG_WORKER, blob, store_dir, str(num_pages), str(page_bytes)]
        self.err = tempfile.TemporaryFile()

    def start(self) -> "SGLangFilePeer":
        try:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.err, text=True)
        except OSError as exc:
            self.err.close()
            raise RuntimeError(f"cannot start {self.args[0]}: {exc}") from None
        hello = self.proc.stdout.readline()
        if not hello:
            self.proc.wait()
            self.err.seek(0)
            last = self.err.read().decode(errors="replace").strip().splitlines()[-1:]
            self.err.close()
            raise RuntimeError(last[0] if last else f"exit status {self.proc.returncode}")
        self.version = json.loads(hello)["sglang"]
        return self

    def __enter__(self) -> "SGLangFilePeer":
        return self

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


async def _ours_read_write(conns: dict, keys: list[bytes], pages: list[memoryview],
                           slots: list[memoryview], what: str) -> dict[str, float]:
    """One timed get_into of every page into the slots (what="get"), or one
    put under fresh keys, deleted afterwards (what="set"), per connector."""
    times = {}
    for name, conn in conns.items():
        if what == "get":
            t0 = time.perf_counter()
            ok = await conn.get_into(keys, slots)
        else:
            fresh = [os.urandom(16) for _ in pages]
            t0 = time.perf_counter()
            ok = await conn.put(fresh, pages)
        times[name] = time.perf_counter() - t0
        if not all(ok):
            raise RuntimeError(f"{name}: {what} failed: {conn.stats()}")
        if what == "set":
            await conn.delete(fresh)
    return times


async def bench_disk_vs_sglang(python: str, quick: bool) -> dict:
    """Section 5 (see the module docstring). GB/s are best of reps; ratios are
    ours / SGLang's, so > 1 means we are faster."""
    num_pages, page_bytes = 32, 16 * LLAMA3_8B_TOKEN_BYTES
    read_reps, write_reps = (5, 3) if quick else (100, 15)
    blob = b"".join(bf16_pages(num_pages, page_bytes, 5, True))
    pages = [memoryview(blob)[i * page_bytes:(i + 1) * page_bytes] for i in range(num_pages)]
    out: dict = {"num_pages": num_pages, "page_bytes": page_bytes, "read_reps": read_reps,
                 "write_reps": write_reps, "load_avg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="l3disk-") as tmp:
        with open(os.path.join(tmp, "pages.bin"), "wb") as f:
            f.write(blob)
        try:
            peer = SGLangFilePeer(python, f.name, os.path.join(tmp, "sglang"), num_pages, page_bytes).start()
        except RuntimeError as exc:
            return {"skipped": f"SGLang not importable by {python}: {exc}"}
        best: dict = {"get": {}, "set": {}}
        with peer:
            # ours: default options (codec none, workers = min(4, cpus)), and
            # the same on one worker thread, as SGLang's batch_get is one thread
            conns = {name: open_connector("disk", path=os.path.join(tmp, name), capacity_bytes=8 << 30,
                                          **options)
                     for name, options in (("kvstore", {}), ("kvstore_1_thread", {"codec_threads": 1}))}
            try:
                keys = [os.urandom(16) for _ in pages]
                for conn in conns.values():
                    if not all(await conn.put(keys, pages)):
                        raise RuntimeError(f"put failed: {conn.stats()}")
                slot_mem = bytearray(num_pages * page_bytes)      # host-pool slots, one block
                slots = [memoryview(slot_mem)[i * page_bytes:(i + 1) * page_bytes] for i in range(num_pages)]
                for what, reps in (("get", 1), ("get", read_reps), ("set", write_reps)):   # 1: warm-up
                    for _ in range(reps):
                        reply = peer.ask(what)
                        if not reply["ok"]:
                            raise RuntimeError(f"SGLang {what} failed")
                        ours = await _ours_read_write(conns, keys, pages, slots, what)
                        times = {"sglang": reply["s"]} | ours
                        best[what] = {k: min(best[what].get(k, float("inf")), t) for k, t in times.items()}
                if slot_mem != blob or not peer.ask("check")["ok"]:
                    raise RuntimeError("read back differs")
            finally:
                for conn in conns.values():
                    await conn.close()
    nbytes = num_pages * page_bytes
    out["sglang"] = peer.version
    out["read_GBps"] = {k: _gbps(nbytes, t) for k, t in best["get"].items()}
    out["write_GBps"] = {k: _gbps(nbytes, t) for k, t in best["set"].items()}
    for what, key in (("get", "read"), ("set", "write")):
        for ours in conns:
            out[f"{key}_{ours}_vs_sglang"] = round(best[what]["sglang"] / best[what][ours], 3)
    out["load_avg_after"] = os.getloadavg()
    print("disk vs sglang", out, flush=True)
    return out


# ---------------------------------------------------------------- main
def datasets(quick: bool) -> tuple[dict[str, list[bytes]], dict]:
    page = 16 * LLAMA3_8B_TOKEN_BYTES // 16      # 128 KiB, the decoder's page size
    n = 8 if quick else 32
    sets, info = {}, {}
    try:
        sets["decoder_kv_bf16"], info = decoder_pages(n * 16)
    except Exception as exc:   # the decoder is another package: report, don't fake
        info = {"error": f"{type(exc).__name__}: {exc}"}
    sets["channel_scaled_random_bf16"] = bf16_pages(n, page, 1, True)
    sets["random_bf16"] = bf16_pages(n, page, 2, False)
    sets["random_bytes"] = [os.urandom(page) for _ in range(n)]
    return sets, info


def llama_pages_from(pages: list[bytes], batch: int) -> list[bytes]:
    """2 MiB pages (16 Llama-3-8B tokens) built by concatenating source pages."""
    target = 16 * LLAMA3_8B_TOKEN_BYTES
    blob = b"".join(pages)
    blob = (blob * (-(-target * batch // len(blob))))[: target * batch]
    return [blob[i * target:(i + 1) * target] for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and reps (a smoke run)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "l3.json"))
    ap.add_argument("--machine", default="cpu-2core dev box")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--backends", default="memory,disk,redis,redis_cluster,mooncake",
                    help="comma-separated backends to run")
    ap.add_argument("--skip-codecs", action="store_true", help="skip sections 1 and 2")
    ap.add_argument("--max-batch-bytes", type=int, default=1 << 30,
                    help="skip throughput cases with more page bytes per batch")
    ap.add_argument("--sglang-python", default=os.environ.get("KVSTORE_SGLANG_PYTHON", sys.executable),
                    help="an interpreter that imports sglang, for section 5 (default: this one)")
    ap.add_argument("--disk-vs-sglang-only", action="store_true",
                    help="run section 5 only; --out defaults to bench/results/l3_disk_vs_sglang.json")
    args = ap.parse_args()
    if args.disk_vs_sglang_only:
        run_disk_vs_sglang_only(args)
        return

    result = {"bench": "l3", "machine": args.machine, "cpus": os.cpu_count(),
              "python": platform.python_version(), "quick": args.quick,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "timing": "best of reps, wall clock; GB = 1e9 bytes; codec figures on one thread"}
    if args.skip_codecs:
        sets = {"channel_scaled_random_bf16": bf16_pages(8, 128 << 10, 1, True)}
    else:
        result["checksum_GBps"] = bench_checksums(5)
        print("checksum", result["checksum_GBps"], flush=True)
        sets, result["decoder"] = datasets(args.quick)
        result["codecs"] = bench_codecs(sets, 3)
        save(result, args.out)
    result["disk_vs_sglang"] = asyncio.run(bench_disk_vs_sglang(args.sglang_python, args.quick))
    save(result, args.out)
    kv = sets.get("decoder_kv_bf16") or sets["channel_scaled_random_bf16"]
    result["end_to_end_pages"] = "decoder_kv_bf16" if "decoder_kv_bf16" in sets else "channel_scaled_random_bf16"
    with servers(segment_bytes=(1 << 30) if args.quick else (3 << 30)) as opts:
        for name in [b for b in opts if not b.startswith("_")]:
            if name not in args.backends.split(","):
                del opts[name]
        result["skipped_backends"] = opts["_skipped"]
        result["end_to_end"] = asyncio.run(bench_end_to_end(opts, llama_pages_from(kv, 32), 2 if args.quick else 5))
        if not args.skip_throughput:
            save(result, args.out)
            result["throughput"] = asyncio.run(bench_throughput(opts, args.quick, args.max_batch_bytes))
    save(result, args.out)


def run_disk_vs_sglang_only(args) -> None:
    out = args.out
    if out == os.path.join(ROOT, "bench", "results", "l3.json"):   # the default: keep the full run's file
        out = os.path.join(ROOT, "bench", "results", "l3_disk_vs_sglang.json")
    result = {"bench": "l3 disk vs sglang", "machine": args.machine, "cpus": os.cpu_count(),
              "python": platform.python_version(), "quick": args.quick,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "timing": "best of reps, reps of each side alternating, wall clock; GB = 1e9 bytes; "
                        "kvstore reads include the XXH3-64 checksum, fingerprint and key checks",
              "disk_vs_sglang": asyncio.run(bench_disk_vs_sglang(args.sglang_python, args.quick))}
    save(result, out)


def save(result: dict, path: str) -> None:
    """Write what is measured so far (a later crash keeps the earlier sections)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path, flush=True)


if __name__ == "__main__":
    main()

"""Throughput of 40 MB model frames between two processes on loopback: our libp2p transport
(Libp2pTransport: encode + sign, then the bulk channel keyed over libp2p: AES-256-GCM records,
reads into an aligned buffer, decode with digest/signature/finiteness checks) against a raw trio
TCP socket moving the same bytes. It also measures the transport with the bulk channel off, i.e.
frames on a py-libp2p stream (Noise + yamux), the path every frame took before.

    .venv/bin/python bench/transport.py [--mb 40] [--frames 5] [--reps 3]

Each side runs in its own process. Warm-up first (raw TCP: one frame into the receive buffer it
reuses; libp2p: four frames, for the connection, hello, bulk ticket or yamux window, and until
the receive-buffer pool hands back buffers: both paths are timed in steady state, where no
receive buffer is touched for the first time, since a fresh 40 MB buffer costs ~10k page faults), then `frames` timed frames; the clock starts at the sender before the first timed
frame and stops at the receiver once the last one is decoded (both read time.time() on one
machine). Each repetition measures the three paths back to back; prints one JSON line with the
medians, and the ratio (libp2p / tcp) computed within each repetition, then its median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from typing import Any

import numpy as np
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- raw TCP -----------------------------------------------------------------------------------------
def tcp_receiver(q: Any, nbytes: int, frames: int, ready: Any) -> None:
    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        q.put(listeners[0].socket.getsockname()[1])
        stream = await listeners[0].accept()
        buf = bytearray(nbytes)
        view = memoryview(buf)
        for k in range(frames + 1):
            n = 0
            while n < nbytes:
                n += await stream.receive_some_into(view[n:]) if hasattr(stream, "receive_some_into") else \
                    _copy(view, n, await stream.receive_some(min(1 << 20, nbytes - n)))
            if k == 0:
                await stream.send_all(b"w")     # warm-up done
                c0 = cpu_s()
        q.put((time.time(), cpu_s() - c0))
    trio.run(main)


def _copy(view: memoryview, n: int, chunk: bytes) -> int:
    view[n:n + len(chunk)] = chunk
    return len(chunk)


def tcp_sender(port: int, nbytes: int, frames: int, q: Any, ready: Any) -> None:
    async def main() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        data = memoryview(np.ones(nbytes // 4, dtype=np.float32).view(np.uint8))
        await stream.send_all(data)
        await stream.receive_some(1)
        q.put(time.time())
        c0 = cpu_s()
        for _ in range(frames):
            await stream.send_all(data)
        q.put(cpu_s() - c0)
        await trio.sleep(1)
    trio.run(main)


WARMUP = 4   # frames in flight at once: sender queue, reader, checker, the consumer's last one


# -- libp2p ----------------------------------------------------------------------------------------
def _transport(i: int, bulk: bool) -> Any:
    from p2pfl.gossip.identity import Identity
    from p2pfl.peers.libp2p import Hello, Libp2pTransport
    return Libp2pTransport(Identity.generate(bytes([i + 1]) * 32), Hello(schema="bench", settings={}),
                           outbox_frames=16, inbox_frames=16, bulk_port=0 if bulk else None)


def p2p_receiver(q: Any, nbytes: int, frames: int, ready: Any, bulk: bool = True) -> None:
    async def main() -> None:
        async with _transport(0, bulk) as t:
            q.put(t.listen_addrs()[0])
            k = 0
            async for _sender, frame in t.receive():
                assert frame.payload.nbytes == nbytes
                k += 1
                if k == WARMUP:
                    ready.set()
                    c0 = cpu_s()
                if k == frames + WARMUP:
                    q.put((time.time(), cpu_s() - c0))
                    await trio.sleep(0.5)
                    return
    trio.run(main)


def p2p_sender(addr: str, nbytes: int, frames: int, q: Any, ready: Any, bulk: bool = True) -> None:
    from p2pfl.gossip.codec import Frame

    async def main() -> None:
        async with _transport(1, bulk) as t:
            peer, _ = await t.connect(addr)
            payload = np.ones(nbytes // 4, dtype=np.float32)
            for r in range(WARMUP):
                await t.send(peer, Frame("model", t.local_id, r, 0, "bench", "f32", payload))
            await trio.to_thread.run_sync(ready.wait, 60)    # the receiver decoded the warm-up frames
            q.put(time.time())
            c0 = cpu_s()
            for r in range(WARMUP, frames + WARMUP):
                await t.send(peer, Frame("model", t.local_id, r, 0, "bench", "f32", payload))
            await t.flush()
            q.put(cpu_s() - c0)
            await trio.sleep(1)
    trio.run(main)


def stream_receiver(q: Any, nbytes: int, frames: int, ready: Any) -> None:
    p2p_receiver(q, nbytes, frames, ready, bulk=False)


def stream_sender(addr: str, nbytes: int, frames: int, q: Any, ready: Any) -> None:
    p2p_sender(addr, nbytes, frames, q, ready, bulk=False)


def measure(recv: Any, send: Any, nbytes: int, frames: int) -> tuple[float, float]:
    """MB/s, and CPU milliseconds per frame of both processes together."""
    ctx = mp.get_context(os.environ.get("BENCH_MP", "spawn"))
    q_r, q_s, ready = ctx.Queue(), ctx.Queue(), ctx.Event()
    r = ctx.Process(target=recv, args=(q_r, nbytes, frames, ready))
    r.start()
    try:
        where = q_r.get(timeout=60)
        s = ctx.Process(target=send, args=(where, nbytes, frames, q_s, ready))
        s.start()
        t0 = q_s.get(timeout=120)
        t1, cpu_r = q_r.get(timeout=120)
        cpu_s_ = q_s.get(timeout=120)
        s.join(30)
    finally:
        for p in (r, locals().get("s")):
            if p is not None and p.is_alive():
                p.kill()
    return frames * nbytes / (t1 - t0) / 1e6, (cpu_r + cpu_s_) / frames * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=40.0)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    nbytes = int(a.mb * 1e6) // 4 * 4
    runs = []
    for _ in range(a.reps):
        tcp = measure(tcp_receiver, tcp_sender, nbytes, a.frames)
        p2p = measure(p2p_receiver, p2p_sender, nbytes, a.frames)
        stream = measure(stream_receiver, stream_sender, nbytes, min(a.frames, 2))   # slow: fewer frames
        runs.append((tcp, p2p, stream))
    med = lambda xs: float(np.median(xs))
    print(json.dumps({"bench": "transport", "frame_mb": nbytes / 1e6, "frames": a.frames, "reps": a.reps,
                      "libp2p_MBps": round(med([r[1][0] for r in runs]), 1),
                      "tcp_MBps": round(med([r[0][0] for r in runs]), 1),
                      "ratio": round(med([r[1][0] / r[0][0] for r in runs]), 3),
                      "libp2p_stream_MBps": round(med([r[2][0] for r in runs]), 1),
                      "ratio_stream": round(med([r[2][0] / r[0][0] for r in runs]), 3),
                      "ratios": [round(r[1][0] / r[0][0], 3) for r in runs],
                      # both processes together; on a machine with fewer free cores than busy threads the
                      # MB/s ratio is about the inverse of this CPU ratio
                      "cpu_ms_per_frame": {"tcp": round(med([r[0][1] for r in runs]), 1),
                                           "libp2p": round(med([r[1][1] for r in runs]), 1),
                                           "libp2p_stream": round(med([r[2][1] for r in runs]), 1)}}))


if __name__ == "__main__":
    main()

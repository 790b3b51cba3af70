"""End-to-end latency through the real daemon over loopback ZeroMQ.

    python -m bench.latency                    # 512² at the 2 µs-dwell rate and at full speed
    python -m bench.latency --quick --no-write
    python -m bench.latency --model ae=stemd/models/paper_ae.pt --steps 2,3 --mode lossless

Each model (default: the shipped conv model at float32 and at bf16, and the paper AE at step 3)
runs in its own daemon; `--mode lossless` pairs the daemon's lossless queue with a lossless
(XPUB_NODROP) simulator, so nothing may be lost anywhere.

The daemon runs as its own `stemd run` process, as on the acquisition PC; this process runs the
simulator (in-process, real PUB socket) and a subscriber that records, per denoised frame, the
daemon's receive→publish latency (header `latency_s`) and acquisition→subscriber latency
(`time.time()` at arrival minus the header's `acquired_at`; one clock, one machine). Sustained
frames/s is published frames over the publishing window; drops come from the daemon's last STATS
message and from ids sent but never published.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
import zmq
import zmq.asyncio

from bench._report import BENCHMARKS, machine_line, model_option, publish
from stemd.apps.simulate import Simulator
from stemd.live import protocol
from stemd.models.checkpoint import DEFAULT_MODEL_PATH, PAPER_AE_PATH, load_checkpoint
from stemd.sim.microscope import SimSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(cfg: dict, workdir: Path) -> subprocess.Popen:
    path = workdir / "stemd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "stemd.apps.cli", "run", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "daemon.log", "w"),
    )


async def wait_ready(sub: zmq.asyncio.Socket, timeout_s: float = 60.0) -> None:
    """The daemon is up once its first STATS message arrives (stats.interval_s is short here)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await sub.poll(200):
            parts = await sub.recv_multipart()
            if parts[0] == protocol.STATS:
                return
    raise RuntimeError("the daemon did not publish STATS in time: see its log")


async def measure(name: str, spec: SimSpec, seconds: float, *, max_rate: bool, daemon_cfg: dict, workdir: Path,
                  lossless: bool = False) -> dict:
    in_port, out_port = free_port(), free_port()
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in daemon_cfg.items()}
    cfg.setdefault("input", {}).update(endpoint=f"tcp://127.0.0.1:{in_port}", mode="connect")
    cfg.setdefault("output", {}).update(endpoint=f"tcp://127.0.0.1:{out_port}", publish_raw=False, hwm=1000)
    cfg.setdefault("stats", {}).update(interval_s=0.5)
    ctx = zmq.asyncio.Context()
    # lossless: small queues, so a full daemon holds the simulator back instead of buffering a backlog
    sim = Simulator(spec, f"tcp://127.0.0.1:{in_port}", max_rate=max_rate, context=ctx, hwm=2 if lossless else 1000,
                    lossless=lossless)
    sim.open()
    proc = start_daemon(cfg, workdir)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100000)
    for topic in (protocol.DENOISED, protocol.STATS):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(f"tcp://127.0.0.1:{out_port}")
    lat, e2e, ids, last_stats = [], [], set(), {}
    try:
        await wait_ready(sub)

        async def collect() -> None:
            nonlocal last_stats
            while True:
                parts = await sub.recv_multipart(copy=False)
                arrived = time.time()
                if bytes(parts[0].buffer) == protocol.STATS:
                    last_stats = protocol.decode_event(parts)[1]
                    continue
                frame = protocol.decode_frame(parts, min_side=1)
                lat.append(frame.header["latency_s"])
                e2e.append(arrived - frame.header["acquired_at"])
                ids.add((frame.header["series_id"], frame.header["frame_id"]))

        collecting = asyncio.create_task(collect())
        publishing = asyncio.create_task(sim.run())
        await asyncio.sleep(sim.startup_delay_s + seconds)
        sim.stop()
        report = await publishing
        drain = time.monotonic() + (60.0 if lossless else 3.0)  # lossless: every frame sent must come out
        while time.monotonic() < drain and not (lossless and len(ids) >= report.frames):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # one more STATS
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        sub.close(linger=0)
        sim.close()
        ctx.term()
    lat_ms, e2e_ms = np.asarray(lat) * 1e3, np.asarray(e2e) * 1e3
    row = dict(
        name=name,
        size=spec.shape[0],
        sent=report.frames,
        published=len(ids),
        sent_fps=report.frames / report.elapsed_s,
        fps=len(ids) / report.elapsed_s,
        dropped=sum(last_stats.get("dropped", {}).values()),
        rejected=sum(last_stats.get("rejected", {}).values()),
        lost=report.frames - len(ids) - sum(last_stats.get("dropped", {}).values()),
        p50=float(np.percentile(lat_ms, 50)) if lat else float("nan"),
        p99=float(np.percentile(lat_ms, 99)) if lat else float("nan"),
        e2e_p50=float(np.percentile(e2e_ms, 50)) if e2e else float("nan"),
        e2e_p99=float(np.percentile(e2e_ms, 99)) if e2e else float("nan"),
        device=last_stats.get("device", "?"),
    )
    print(
        f"{name:<34} sent {row['sent']:4d} ({row['sent_fps']:6.2f}/s) published {row['published']:4d} "
        f"({row['fps']:6.2f}/s) dropped {row['dropped']:3d} lost {row['lost']:3d}  "
        f"recv→pub p50 {row['p50']:7.1f} p99 {row['p99']:7.1f} ms  acq→sub p50 {row['e2e_p50']:7.1f} "
        f"p99 {row['e2e_p99']:7.1f} ms",
        flush=True,
    )
    return row


def to_markdown(rows: list[dict], args) -> str:
    lines = [
        f"Machine: {machine_line()}. Measured {datetime.date.today()}; daemon device: {rows[0]['device']}.",
        f"Command: `python -m bench.latency{' --quick' if args.quick else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}{f' --load {args.load}' if args.load else ''}` "
        f"({args.seconds:g} s per row; the daemon is a separate `stemd run` process, "
        f"queue {args.mode}, max_batch {args.max_batch}, maxsize {args.maxsize}).",
        "",
        "| feed | frame | sent/s | published/s | dropped | lost | recv→publish p50 / p99 (ms) | acquisition→subscriber "
        "p50 / p99 (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['size']}² | {r['sent_fps']:.2f} | {r['fps']:.2f} | {r['dropped']} | {r['lost']} | "
            f"{r['p50']:.1f} / {r['p99']:.1f} | {r['e2e_p50']:.1f} / {r['e2e_p99']:.1f} |"
        )
    lines += [
        "",
        "`lost` = sent − published − dropped by the daemon: frames the PUB/SUB high-water marks shed "
        "before the daemon read them (live mode sheds on purpose; in lossless mode the simulator is an "
        "XPUB_NODROP publisher, see docs/protocol.md, and must lose nothing).",
    ]
    return "\n".join(lines) + "\n"


def variants(args) -> list[tuple[str, dict]]:
    """(label, model settings) per daemon to run: each model with its options, at each step (window models)."""
    out = []
    for name, path, options in args.models:
        window = load_checkpoint(path)[0].arch()["name"] == "window_ae"
        for step in (args.steps or [3]) if window else [None]:
            extras = [
                f"step {step}" if step else "",
                options.get("precision", ""),
                "flips" if options.get("flips") else "",
                f"dejitter {options['dejitter']}" if "dejitter" in options else "",
                "no planar guide" if options.get("planar") is False else "",
            ]
            label = ", ".join(filter(None, [name, *extras]))
            model = {"device": args.device, "path": str(path), **options} | (
                {"threads": args.threads} if args.threads else {})
            out.append((label, model | ({"step": step} if step else {})))
    return out


async def amain(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in variants(args):
            daemon_cfg = {
                "model": model,
                "queue": {"mode": args.mode, "max_batch": args.max_batch, "maxsize": args.maxsize},
                "log_level": "WARNING",
            }
            for size in args.sizes:
                spec = SimSpec(shape=(size, size), dwell_us=args.dwell_us)
                paced = f"{label}, paced ({args.dwell_us:g} µs dwell: {1 / spec.frame_period_s:.2f} fps)"
                for name, max_rate in ((paced, False), (f"{label}, full speed", True)):
                    rows.append(await measure(name, spec, args.seconds, max_rate=max_rate, daemon_cfg=daemon_cfg,
                                              workdir=Path(tmp), lossless=args.mode == "lossless"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        type=model_option,
        action="append",
        metavar="NAME=PATH[@bf16][+flips][+dejitterN][+noplanar][+nokeep][+norecover]",
        help="a checkpoint to run in the daemon (repeatable; default: conv, conv@bf16, paper AE)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--dwell-us", type=float, default=2.0)
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="floating-window steps for window models (default 3)")
    p.add_argument("--mode", choices=["live", "lossless"], default="live")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--maxsize", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=0, help="the daemon's model.threads (0: torch's default)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="N busy processes competing for the CPU beside the daemon, as the microscope's software")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", type=Path, default=BENCHMARKS)
    args = p.parse_args(argv)
    args.models = args.model or [("conv", DEFAULT_MODEL_PATH, {}), ("conv", DEFAULT_MODEL_PATH, {"precision": "bf16"}),
                                 ("paper AE", PAPER_AE_PATH, {})]
    if args.quick:
        args.sizes, args.seconds = args.sizes or [128], min(args.seconds, 4.0)
    args.sizes = args.sizes or [512]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        rows = asyncio.run(amain(args))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    text = to_markdown(rows, args)
    publish(text, args.out, "Latency (bench/latency.py)", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

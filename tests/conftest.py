"""Shared fixtures: a working model checkpoint, one torch thread, and a ZeroMQ test publisher. Keep it small."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio


def pca_model(rank: int = 96, window: int = 28, seed: int = 0):
    """A WindowAE that projects each window onto the top `rank` principal components of clean
    lattice windows: a real denoiser built in well under a second, no training loop.
    ReLU(Pv) - ReLU(-Pv) = Pv makes the one-hidden-layer AE exactly linear."""
    from stemd.models.window_ae import WindowAE
    from stemd.sim.lattice import clean_windows

    clean = clean_windows(2000, np.random.default_rng(seed), size=window).reshape(2000, -1).astype(np.float64)
    mean = clean.mean(0)
    centred = clean - mean
    basis = np.linalg.eigh(centred.T @ centred)[1][:, ::-1][:, :rank].T.copy()
    model = WindowAE(window, [2 * rank])
    enc, dec = model.linear_layers()
    p = torch.from_numpy(np.concatenate([basis, -basis])).float()
    with torch.no_grad():
        enc.weight.copy_(p)
        enc.bias.copy_(-p @ torch.from_numpy(mean).float())
        dec.weight.copy_(p.T)
        dec.bias.copy_(torch.from_numpy(mean).float())
    return model.eval()


@pytest.fixture
def one_torch_thread():
    """One torch thread: on a busy 2-core machine two threads wait on each other (measured 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The shipped paper AE when it exists, else a PCA-projection WindowAE saved as a checkpoint."""
    from stemd.models.checkpoint import PAPER_AE_PATH, save_checkpoint

    if PAPER_AE_PATH.is_file():
        return PAPER_AE_PATH
    path = tmp_path_factory.mktemp("model") / "pca.pt"
    save_checkpoint(path, pca_model(), {"note": "test PCA projection", "step": 4})
    return path


class TestPublisher:
    """An XPUB standing in for the microscope: knows when a subscriber is attached.

    With `nodrop=True` a full subscriber makes sends wait instead of dropping (lossless tests).
    """

    __test__ = False

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str = "tcp://127.0.0.1:*", *, bind: bool = True,
                 nodrop: bool = False, hwm: int = 1000) -> None:
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        if nodrop:
            self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.linger = 1000
        if bind:
            self.sock.bind(endpoint)
        else:
            self.sock.connect(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint

    async def wait_subscribed(self, topic: bytes = b"frame", timeout: float = 10.0) -> None:
        """Wait for a subscription to `topic` (so nothing sent afterwards is lost to a slow joiner)."""
        async def _wait() -> None:
            while True:
                msg = await self.sock.recv()
                if msg[:1] == b"\x01" and msg[1:] == topic:
                    return

        await asyncio.wait_for(_wait(), timeout)

    async def send(self, parts: list) -> None:
        """Send; with nodrop, a full subscriber answers EAGAIN (libzmq's XPUB_NODROP): wait and retry."""
        while True:
            try:
                return await self.sock.send_multipart(parts, copy=False)
            except zmq.Again:
                await asyncio.sleep(0.005)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def zctx():
    """A fresh asyncio ZeroMQ context, destroyed after the test."""
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)

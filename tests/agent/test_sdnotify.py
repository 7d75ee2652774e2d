"""systemd notify protocol over a real unix datagram socket (path and abstract)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_env import AgentEnv, devices_from_example
from support.broker import MosquittoBroker

from fieldtwin.agent.config import load_config
from fieldtwin.agent.runtime import Agent
from fieldtwin.agent.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("3 points")
    assert received(sock) == ["READY=1", "STATUS=3 points"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert received(sock) == ["STOPPING=1"]


def test_abstract_namespace_socket() -> None:
    name = f"fieldtwin-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert received(sock) == ["STATUS=hello"]


def test_watchdog_interval_is_half_the_timeout_and_respects_the_pid() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval() == 1.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval() is None
    assert Notifier({}).watchdog_interval() is None


def test_outside_systemd_everything_is_a_no_op(tmp_path: Path) -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert not gone.watchdog()  # a vanished socket is logged, never raised
    assert gone.failures == 1


async def test_the_agent_is_ready_feeds_the_watchdog_and_says_stopping(
    listener: tuple[socket.socket, str], tmp_path: Path, broker: MosquittoBroker
) -> None:
    sock, path = listener
    sock.setblocking(False)
    env = AgentEnv.create(tmp_path, "gw-notify", broker)
    device = devices_from_example("pumps")[0]
    device.update(port=1, timeout_s=0.2)  # nothing listens: the agent must run regardless
    config = load_config(env.write_config([device]))
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    agent = Agent(config, notifier=notifier)
    task = asyncio.create_task(agent.run())
    loop = asyncio.get_running_loop()
    messages: list[str] = []
    try:
        async with asyncio.timeout(30):
            while messages.count("WATCHDOG=1") < 3:
                data = await loop.sock_recv(sock, 4096)
                messages += data.decode().split("\n")
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 30) == 0
    async with asyncio.timeout(10):
        while "STOPPING=1" not in messages:
            messages += (await loop.sock_recv(sock, 4096)).decode().split("\n")
    assert messages[0] == "READY=1"
    assert messages.index("READY=1") < messages.index("WATCHDOG=1")

"""An in-memory Kubernetes API (kmock's KubernetesEmulator on a loopback port, in its own thread and event loop)
and the real operator (`run_operator`, the function `pdserve operator` runs) talking to it over HTTP.

What the emulator does: stores objects, serves discovery, get/list/watch/create/patch (merge patches and
server-side apply as a deep merge, JSON patches)/delete, and honours finalizers and deletionTimestamp.
What it does not: no controllers (no pods, no Deployment status unless a test writes it, no garbage collection
by owner references: the operator's finalizer deletes the owned objects itself), no CRD schema validation
(tests/unit/operator checks the schema), no uid or generation (tests set them), and it never changes
metadata.resourceVersion, so kopf cannot tell its own patches from stale events and may run a handler twice
for one change: the handlers are idempotent (apply), which these tests rely on."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client

from coordinator.operator.handlers import run_operator
from coordinator.operator.kube import Kube
from coordinator.operator.plan import PlannerFn, call_planner

VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
RESOURCES = {
    "pdserve.io/v1alpha1/pdclusters": kmock.ResourceInfo(
        kind="PDCluster", singular="pdcluster", namespaced=True, verbs=VERBS, subresources={"status"}
    ),
    "apps/v1/deployments": kmock.ResourceInfo(
        kind="Deployment", namespaced=True, verbs=VERBS, subresources={"status"}
    ),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs=VERBS),
    "v1/nodes": kmock.ResourceInfo(kind="Node", namespaced=False, verbs=VERBS),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs=VERBS),
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS),
}


class FakeApiServer:
    def __init__(self) -> None:
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fake-kube-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the fake Kubernetes API did not start: {self._error!r}")
        self.kube = Kube(client.ApiClient(client.Configuration(host=self.url)))

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __init__ / stop
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for key, info in RESOURCES.items():
                emulator.resources[key] = info
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{self.url}"}}}}]
users: [{{name: fake, user: {{token: fake-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]
current-context: fake
"""
        )
        return path


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `pred` until it returns something truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    ev = threading.Event()
    while True:
        out = pred()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        ev.wait(0.05)


class OperatorHarness:
    def __init__(self, api: FakeApiServer, kube: Kube) -> None:
        self.api = api
        self.kube = kube


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    api = FakeApiServer()
    yield api
    api.stop()


def start_operator(
    api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planner: PlannerFn = call_planner
) -> Callable[[], None]:
    """Run the operator in a thread against `api`; returns the function that stops it."""
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    kube = Kube(client.ApiClient(client.Configuration(host=api.url)))
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_operator(namespaces=None, planner=planner, kube=kube, stop_flag=stop, ready_flag=ready)
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=run, name="operator", daemon=True)
    t.start()
    assert ready.wait(30), "the operator did not start"
    assert not errors, errors

    def stopper() -> None:
        stop.set()
        t.join(30)
        assert not t.is_alive(), "the operator did not stop"
        assert not errors, errors

    return stopper

"""Shared e2e fixtures (built on tests/cluster.py, whose functions the tests import for the leak checks).

start_cluster(model_dir, *, env=None, **ClusterConfig overrides) -> LocalCluster   (function scope)
    starts a CPU cluster (1P1D by default) and stops it after the test, checking no process is left;
module_clusters.start(...) -> LocalCluster / module_clusters.start_many(specs) -> {name: LocalCluster}
    the same for clusters a whole module shares, stopped (and checked) after the module;
cluster -> LocalCluster   (module scope): a 1P1D cluster on the tiny random model.

A failed test's report gets the tails of the logs of the clusters it used (the children's log files live
in temporary folders a CI run does not keep).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pluggy
import pytest

from pdserve.launcher import LocalCluster
from tests.cluster import Clusters, log_tails


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    clusters: list[LocalCluster] = []
    for value in getattr(item, "funcargs", {}).values():
        owner = getattr(value, "__self__", value)  # the start_cluster fixture is a bound Clusters.start
        if isinstance(owner, Clusters):
            clusters.extend(owner.started)
        elif isinstance(owner, LocalCluster):
            clusters.append(owner)
    if clusters:
        report.sections.append(("cluster logs", log_tails(clusters)))


@pytest.fixture
def start_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LocalCluster]]:
    clusters = Clusters(tmp_path_factory)
    try:
        yield clusters.start
    finally:
        clusters.close()


@pytest.fixture(scope="module")
def module_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    clusters = Clusters(tmp_path_factory)
    try:
        yield clusters
    finally:
        clusters.close()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, module_clusters: Clusters) -> LocalCluster:
    return module_clusters.start(tiny_model_dir)

"""The operator's few Kubernetes API calls (dicts in, dicts out) over the `kubernetes` client's ApiClient:
get, list, create-or-apply (server-side apply), delete, and a merge patch of a PDCluster's status."""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config

FIELD_MANAGER = "pdserve-operator"

# kind -> (API prefix, plural); the operator owns only these kinds
_PATHS = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "PDCluster": ("/apis/pdserve.io/v1alpha1", "pdclusters"),
}


class KubeError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


def path_of(kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = _PATHS[kind]
    p = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{p}/{name}" if name else p


def load_api_client() -> client.ApiClient:
    """In a pod: its service account; elsewhere: the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """The response object, or None for 404."""
        m, url, headers, data, _post = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(m, url, header_params=headers, body=data)
        raw = resp.read() or b""
        if resp.status == 404:
            return None
        if not 200 <= resp.status < 300:
            raise KubeError(resp.status, method, path, raw.decode(errors="replace"))
        return json.loads(raw) if raw else {}

    def get(self, path: str) -> dict[str, Any] | None:
        return self._call("GET", path)

    def list(self, path: str, label_selector: str = "") -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        out = self._call("GET", path, query=query)
        return list((out or {}).get("items") or [])

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj`, or server-side apply it over the existing object (the fields it names win)."""
        meta = obj["metadata"]
        path = path_of(obj["kind"], meta["namespace"], meta["name"])
        if self.get(path) is None:
            out = self._call("POST", path_of(obj["kind"], meta["namespace"]), body=obj)
        else:
            out = self._call(
                "PATCH",
                path,
                body=obj,
                query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                content_type="application/apply-patch+yaml",
            )
        assert out is not None
        return out

    def delete(self, path: str) -> bool:
        """False if it was already gone."""
        return self._call("DELETE", path, body={"propagationPolicy": "Background"}) is not None

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._call(
            "PATCH",
            path_of("PDCluster", namespace, name) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

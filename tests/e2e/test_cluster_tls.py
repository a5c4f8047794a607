"""End to end with TLS everywhere: certificates from `pdserve certs`, a 1P1D cluster whose gateway serves
TLS and whose inside is mutual TLS (TLS-only Redis, instances requiring client certificates), serving
greedy output equal to the single-process reference through `pdserve.client`, `pdserve generate` and the
HTTPS API, with an API key (UNAUTHENTICATED without it).
And the KV hand-off's lease token at cluster level: a decode instance given the handle without its token
gets PERMISSION_DENIED and no KV, the lease stays, and the handle with its token then serves."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import LocalCluster
from pdserve.tls import TLSFiles
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.cluster import start_cluster, stop_cluster

PDSERVE = [sys.executable, "-m", "pdserve"]
KEY = "sk-tls-test-key"  # the gateway's API key: TLS and authentication together
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n", "x", "The quick brown fox"]


def _stats(cluster: LocalCluster, tls: TLSFiles) -> dict[str, common_pb2.InstanceStats]:
    out = {}
    registry = Registry(cluster.redis_url, tls=tls)
    try:
        for inst in registry.instances():
            with cluster.instance_channel(inst.grpc_address) as ch:
                stub = (
                    prefill_pb2_grpc.PrefillStub if inst.role == "prefill" else decode_pb2_grpc.DecodeStub
                )(ch)
                out[inst.role] = stub.Stats(common_pb2.InstanceStatsRequest(), timeout=10)
    finally:
        registry.close()
    return out


def test_tls_gateway_and_mutual_tls_cluster_serve_the_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    made = subprocess.run(
        [*PDSERVE, "certs", str(tmp_path / "certs")], capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    certs = tmp_path / "certs"
    tls = TLSFiles(str(certs / "cert.pem"), str(certs / "key.pem"), str(certs / "ca.pem"))
    other = subprocess.run([*PDSERVE, "certs", str(tmp_path / "other")], capture_output=True, timeout=60)
    assert other.returncode == 0

    reference = LocalEngine.from_model_dir(str(tiny_model_dir))
    tok = reference.tokenizer
    reqs = [(p, 4 + 3 * i) for i, p in enumerate(PROMPTS)]
    expected = reference.generate(
        [tok.encode(p) for p, _ in reqs], [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in reqs]
    )

    cluster = start_cluster(
        tiny_model_dir, tmp_path / "logs", num_kv_blocks=128, tls=tls, http_port=0, api_keys=(KEY,)
    )
    try:
        assert cluster.redis_url.startswith("rediss://")
        with Client(cluster.gateway_address, KEY, tls_ca=tls.ca) as client:
            for (prompt, max_tokens), want in zip(reqs, expected, strict=True):
                got = client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, timeout=120)
                assert got.token_ids == want, (
                    f"prompt {prompt!r}: cluster {got.token_ids} != reference {want}"
                )
        # TLS with a wrong key or none: UNAUTHENTICATED, and nothing ran
        for key in (None, "sk-wrong"):
            with (
                Client(cluster.gateway_address, key, tls_ca=tls.ca) as client,
                pytest.raises(grpc.RpcError) as err,
            ):
                client.generate("x", max_tokens=2, timeout=20)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the OpenAI-compatible HTTP API serves HTTPS with the same certificate (and the same key)
        prompt, max_tokens = reqs[0]
        # the openai client's own httpx2 client (openai.DefaultHttpxClient), trusting the cluster's CA
        with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=tls.ca)) as http:
            api = openai.OpenAI(base_url=f"https://{cluster.http_address}/v1", api_key=KEY, http_client=http)
            done_http = api.completions.create(
                model=Path(tiny_model_dir).name,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
        # token_ids (return_token_ids) is pdserve's field, which the openai types keep as a pydantic extra
        assert (done_http.choices[0].model_extra or {}).get("token_ids") == expected[0]
        with pytest.raises(httpx.ConnectError):  # a client trusting another CA: the handshake fails
            httpx.get(
                f"https://{cluster.http_address}/health",
                verify=ssl.create_default_context(cafile=str(tmp_path / "other" / "ca.pem")),
            )
        # the CLI's path, and clients that cannot complete the handshake
        cli = subprocess.run(
            [*PDSERVE, "generate", "--addr", cluster.gateway_address, "--tls-ca", tls.ca, "--api-key", KEY]
            + ["--max-tokens", "8"]
            + ["--ignore-eos", PROMPTS[0]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        want8 = reference.generate([tok.encode(PROMPTS[0])], [SamplingParams(max_tokens=8, ignore_eos=True)])[
            0
        ]
        assert cli.stdout == tok.decode(want8) + "\n"
        for client in (
            Client(cluster.gateway_address, KEY),  # plaintext to a TLS port
            Client(cluster.gateway_address, KEY, tls_ca=str(tmp_path / "other" / "ca.pem")),  # another CA
        ):
            with client, pytest.raises(grpc.RpcError) as err:
                client.generate("x", max_tokens=2, timeout=20)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # the lease token: prefill on the prefill instance, then ask the decode instance without the token
        stats = _stats(cluster, tls)
        registry = Registry(cluster.redis_url, tls=tls)
        addresses = {i.role: i.grpc_address for i in registry.instances()}
        registry.close()
        prompt_ids = tok.encode(PROMPTS[1])
        sampling = common_pb2.SamplingParams(max_tokens=6, ignore_eos=True)
        with cluster.instance_channel(addresses["prefill"]) as ch:
            events = list(
                prefill_pb2_grpc.PrefillStub(ch).Prefill(
                    prefill_pb2.PrefillRequest(
                        request_id="tok", prompt_token_ids=prompt_ids, sampling=sampling
                    ),
                    timeout=60,
                )
            )
        done = events[-1].done
        assert len(done.kv.token) == 16
        stolen = common_pb2.KVHandle()
        stolen.CopyFrom(done.kv)
        stolen.token = b""
        with cluster.instance_channel(addresses["decode"]) as ch:
            stub = decode_pb2_grpc.DecodeStub(ch)
            bad = decode_pb2.DecodeRequest(
                request_id="tok-bad", prompt_token_ids=prompt_ids, sampling=sampling, kv=stolen
            )
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Decode(bad, timeout=60))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
            after = _stats(cluster, tls)
            assert after["prefill"].leases == 1  # kept for the right puller
            assert after["prefill"].kv_unauthorized_pulls == stats["prefill"].kv_unauthorized_pulls + 1
            assert after["decode"].kv_blocks_free == after["decode"].kv_blocks_total  # nothing held for it
            good = decode_pb2.DecodeRequest(
                request_id="tok-good",
                prompt_token_ids=prompt_ids,
                sampling=sampling,
                kv=done.kv,
                first_token_id=done.first_token_id,
            )
            tokens = [done.first_token_id]
            for ev in stub.Decode(good, timeout=60):
                tokens.extend(ev.token_ids)
        want = reference.generate([prompt_ids], [SamplingParams(max_tokens=6, ignore_eos=True)])[0]
        assert tokens == want
        final = _stats(cluster, tls)
        assert (
            final["prefill"].leases == 0
            and final["prefill"].kv_blocks_free == final["prefill"].kv_blocks_total
        )
        assert all(s.integrity_ok for s in final.values())
    finally:
        stop_cluster(cluster)

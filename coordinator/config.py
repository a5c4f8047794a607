"""The coordinator process's one frozen config."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.tls import TLSFiles


@dataclass(frozen=True)
class CoordinatorConfig:
    model_dir: str  # tokenizer + config.json are read here; weights are never loaded by the gateway
    redis_url: str
    cluster: str = "default"
    host: str = "127.0.0.1"
    advertise_host: str = ""  # the host clients reach the gateway at (its telemetry identity); "" = host
    port: int = 50051  # gateway gRPC port; 0 = a free one (printed on stdout)
    expect_prefill: int = 1  # health reports SERVING once this many of each role are registered
    expect_decode: int = 1
    codec: str = "auto"  # KV codec: a name, or "auto" = chosen per link (kv_transfer/choice.py)
    max_kl: float = 0.01  # quality floor for "auto": mean per-token KL (nats) a lossy codec may cost
    # Layer-wise streaming: decode starts pulling the KV when prefill schedules the request, so each layer
    # moves while later layers compute. "auto": only from a CUDA prefill instance, whose copies leave its
    # compute alone; a CPU prefill instance would encode and send on the cores computing the prompt, which
    # slowed its pass and delayed the first token (docs/benchmarks.md). "on" / "off": always / never.
    layerwise: str = "auto"
    # Conditional disaggregation (Dynamo's "conditional disaggregation", llm-d's selective P/D): where a
    # prompt of at most `local_prefill_max_tokens` tokens is prefilled. "off": always on a prefill
    # instance. "busy": on a decode instance when every prefill instance already has `local_prefill_depth`
    # requests of this gateway in flight (the prompt would wait that many passes) and fewer local prefills
    # are pending than there are decode instances (decodes stall for one short pass at a time).
    # "always": on a decode instance. A local prefill stalls that instance's decodes for one pass, so the
    # limit is kept to about one saturating CPU pass (128 tokens; measured in docs/benchmarks.md).
    # "busy" is the default: in every recorded bench compare run it served at least the pure split's goodput
    # within the run's spread (docs/benchmarks.md, "Headline ratios by host").
    local_prefill: str = "busy"
    local_prefill_max_tokens: int = 128
    local_prefill_depth: int = 2
    # Decode tokens come back on one long-lived stream per decode instance, each step's tokens of all this
    # gateway's requests there in one message (`coordinator.token_stream`); False: one message per token
    # on each request's own call (what instances without the stream get anyway).
    token_stream: bool = True
    refresh_s: float = 0.25  # registry snapshot period
    max_inflight: int = 4096  # requests in flight before RESOURCE_EXHAUSTED
    # Requests waiting for their first token (queued for prefill) before a new one gets RESOURCE_EXHAUSTED at
    # once; 0 = no limit but max_inflight.
    max_queue: int = 0
    # KV budget, as a multiple of the KV capacity (tokens) of the registered decode (colocated) instances;
    # 0 = off. A new request gets RESOURCE_EXHAUSTED at once when the KV tokens the gateway's requests in
    # flight reserve (prompt + max_tokens each, what a decode instance reserves), its own included, would
    # exceed it: 1.0 admits what the decode instances can hold at once, 2.0 lets as much again wait.
    kv_budget: float = 0.0
    suspect_s: float = (
        5.0  # an instance that failed a call (died, refused the connection) is skipped this long
    )
    # Failover (gateway._Failover): a request's calls that fail because an instance died or went away are
    # retried (decode resumes from the tokens already sent) up to `max_failovers` times per request; a
    # request finding no instance of a role waits up to `failover_wait_s` (and never past its deadline) for
    # the registry to show one (a restarted instance) before it fails with UNAVAILABLE.
    max_failovers: int = 5
    failover_wait_s: float = 10.0
    # The applied plan's KV links (`pdserve plan` JSON, coordinator --plan): (prefill instance id, decode
    # instance id, codec); the router pairs each prefill instance with its linked decode instances only and
    # the hand-off uses the link's codec. () = every pair, codec per `codec`.
    kv_links: tuple[tuple[str, str, str], ...] = ()
    # Replanning (coordinator/replanner.py; with a plan that records its search inputs): every
    # `replan_interval_s` (0 = never) the window of the last `replan_window_s` seconds of finished requests
    # is searched once at least `replan_min_requests` are in it. `autoplan`: the recommended plan is taken
    # as the one in force (pdserve up --autoplan starts and stops the instances).
    replan_interval_s: float = 10.0
    replan_window_s: float = 60.0
    replan_min_requests: int = 20
    autoplan: bool = False
    colocated: bool = False  # baseline mode: proxy Generate to colocated instances (no prefill/decode)
    expect_colocated: int = 1  # colocated mode: SERVING once this many colocated instances are registered
    # TLS (pdserve/tls.py): with a certificate the gateway's public port serves TLS (no client certificate
    # asked); with a CA too, the router's channels to instances and the registry are mutual TLS.
    tls: TLSFiles = field(default_factory=TLSFiles)
    http_port: int | None = None  # OpenAI-compatible HTTP API port; None = no HTTP server, 0 = a free one
    # API keys a client must send (gRPC metadata / HTTP header `authorization: Bearer KEY`); () = open.
    # Never printed: repr=False keeps them out of any log of the config.
    api_keys: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        self.tls.require_cluster_identity()
        if self.layerwise not in LAYERWISE_POLICIES:
            raise ValueError(f"layerwise must be one of {LAYERWISE_POLICIES}, got {self.layerwise!r}")
        if self.local_prefill not in LOCAL_PREFILL_POLICIES:
            raise ValueError(
                f"local_prefill must be one of {LOCAL_PREFILL_POLICIES}, got {self.local_prefill!r}"
            )
        if self.max_failovers < 0 or self.failover_wait_s < 0 or self.max_queue < 0:
            raise ValueError("max_failovers, failover_wait_s and max_queue must be >= 0")
        if not self.kv_budget >= 0 or self.kv_budget == float("inf"):
            raise ValueError(f"kv_budget must be a finite multiple >= 0 (0 = off), got {self.kv_budget}")
        if self.local_prefill_depth < 1:
            raise ValueError(f"local_prefill_depth must be >= 1, got {self.local_prefill_depth}")
        if self.local_prefill_max_tokens < 1:
            raise ValueError(f"local_prefill_max_tokens must be >= 1, got {self.local_prefill_max_tokens}")


LOCAL_PREFILL_POLICIES = ("off", "busy", "always")
LAYERWISE_POLICIES = ("auto", "on", "off")

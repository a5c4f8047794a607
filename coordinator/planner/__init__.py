"""The planner: from a model, a latency profile, a topology, SLOs and a workload to a deployment plan.

A pure core (no I/O, no torch, no numpy; plain Python): `model` (sizes from a HF config), `latency`
(per-layout latency models and their least-squares fit), `distserve` (DistServe's published profile files),
`topology` (nodes, devices, bandwidths), `simulator` (a discrete-event simulation of a plan), `search` (the
plan with the highest goodput per device), `plan` (the plan object and its JSON). The CLI adapters live in
pdserve/plan_cli.py. See docs/architecture.md ("Planner").
"""

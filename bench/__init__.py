"""pdserve benchmark harness: seeded workloads, serving metrics, goodput search, JSON reports and plots."""

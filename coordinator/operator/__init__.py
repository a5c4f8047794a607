"""The Kubernetes operator of PDCluster resources (`pdserve operator`): spec.py (the spec and its checks),
plan.py (manual plans, node topology, the planner adapter), render.py (the owned objects as dicts),
kube.py (API calls), handlers.py (the kopf handlers)."""

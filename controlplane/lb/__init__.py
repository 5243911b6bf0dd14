"""Load balancer adapters: the committed decision turned into load balancer settings.

- `render`: pure functions, decision in, HAProxy runtime commands / an nginx `upstream`
  block / an Envoy `ClusterLoadAssignment` out; the agent's `GET /v1/weights/{service}`
  and the adapters share them, and they never render a backend with no server serving.
- `follow`: follows the decision from the agents (blocking queries, next agent on
  failure, revision fencing, last state kept when no agent answers).
- `haproxy`, `nginx`: the adapters behind `controlplane lb haproxy` and
  `controlplane lb nginx`; `mapfile` reads their map files, `status` their status file.
"""

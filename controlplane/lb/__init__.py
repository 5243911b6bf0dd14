"""Load balancer adapters: the committed decision turned into load balancer settings.

- the renderers live in `controlplane.formats` (pure: decision in, HAProxy runtime
  commands / an nginx `upstream` block / an Envoy `ClusterLoadAssignment` out), shared
  with the agent's `GET /v1/weights/{service}`; they never render a backend with no
  server serving.
- `follow`: follows the decision from the agents (blocking queries, next agent on
  failure, revision fencing, last state kept when no agent answers).
- `haproxy`, `nginx`: the adapters behind `controlplane lb haproxy` and
  `controlplane lb nginx`; `mapfile` reads their map files, `status` their status file.
"""

"""The test harness: a whole deployment on loopback, and the world around it.

Used by `controlplane demo`, the test suite and the benchmarks, never by the daemon
(the import contract in pyproject.toml keeps it that way), like aiohttp's
`test_utils` and `kopf.testing`:

- `localcluster.LocalCluster`: real agent processes with a generated config, simulated
  backends, optional fault proxies between agents, torn down fully even on failure;
  `demo.yaml` is the deployment it starts by default (shipped as package data);
- `faultproxy`: a TCP proxy that partitions (reset or black hole) and delays;
- `etcdlocal.LocalEtcd`: a private etcd on loopback;
- `prometheuslocal.LocalPrometheus`: a private Prometheus on loopback scraping the
  simulated backends;
- `backend.SimBackend`: a region's service that can be up, refusing, black-holed,
  slow, answering 503 or flapping, with Prometheus metrics (error ratio, latency,
  memory);
- `loadbalancer.SimLoadBalancer`: sends real requests by the committed weights;
- `application.SimApplication`: an application enforcing the decision with the SDK's
  middleware, and simulated users calling it.

This package imports nothing itself, so that `python -m controlplane.testing.backend`
(and `.faultproxy`) runs the module once, as `__main__`, without a second copy.
"""

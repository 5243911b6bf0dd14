"""The probe targets a configuration describes, every target with its defaults filled in."""

from __future__ import annotations

from controlplane.config import PrometheusTargetConfig, Settings
from controlplane.probes.target import DEFAULT_EXPECT_STATUS, ProbeKind, ProbeTarget, PrometheusProbe
from controlplane.promql import parse_condition


def probe_targets(settings: Settings) -> list[ProbeTarget]:
    defaults = settings.model.probes
    targets = []
    for region, rc in settings.regions.items():
        for service, sc in rc.services.items():
            for t in sc.targets:
                kind: ProbeKind
                host = port = None
                prometheus = None
                if t.prometheus is not None:
                    kind = "prometheus"
                    prometheus = _prometheus(t.prometheus, defaults.prometheus.servers)
                elif t.url is not None and t.url.startswith("tcp://"):
                    kind = "tcp"
                    host, _, port_text = t.url.removeprefix("tcp://").rpartition(":")
                    port = int(port_text)
                else:
                    kind = "http"
                targets.append(
                    ProbeTarget(
                        region=region,
                        service=service,
                        kind=kind,
                        url=t.url if kind == "http" else None,
                        host=host,
                        port=port,
                        interval_s=t.interval_s or defaults.interval_s,
                        timeout_s=t.timeout_s or defaults.timeout_s,
                        rise=t.rise or defaults.rise,
                        fall=t.fall or defaults.fall,
                        expect_status=t.expect_status or defaults.expect_status or DEFAULT_EXPECT_STATUS,
                        prometheus=prometheus,
                    )
                )
    return targets


def _prometheus(config: PrometheusTargetConfig, default_servers: tuple[str, ...]) -> PrometheusProbe:
    down = config.down
    return PrometheusProbe(
        servers=config.servers or default_servers,
        down_query=down.query,
        down_when=parse_condition(down.when),
        down_for_s=down.for_s,
        down_name=down.name or "",
        slow_query=config.slow.query if config.slow is not None else None,
        utilization_query=config.utilization.query if config.utilization is not None else None,
    )

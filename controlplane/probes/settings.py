"""The probe targets a configuration describes, every target with its defaults filled in."""

from __future__ import annotations

from controlplane.config import Settings
from controlplane.probes.target import DEFAULT_EXPECT_STATUS, ProbeKind, ProbeTarget


def probe_targets(settings: Settings) -> list[ProbeTarget]:
    defaults = settings.model.probes
    targets = []
    for region, rc in settings.regions.items():
        for service, sc in rc.services.items():
            for t in sc.targets:
                kind: ProbeKind = "tcp" if t.url.startswith("tcp://") else "http"
                host = port = None
                if kind == "tcp":
                    host, _, port_text = t.url.removeprefix("tcp://").rpartition(":")
                    port = int(port_text)
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
                    )
                )
    return targets

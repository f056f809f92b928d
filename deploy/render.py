"""Write the committed proxy configurations from ``sortformer_triton/proxy.py`` (their one source).

- ``deploy/haproxy/compose.cfg``: the compose profile ``replicas`` (docker-compose.yml), replicas listed by
  service name, re-resolved through Docker's DNS;
- ``deploy/k8s/haproxy.cfg``: the Kubernetes proxy (deploy/k8s), replicas discovered from the headless
  Service's DNS SRV records.

    python -m deploy.render           # rewrite both
    python -m deploy.render --check   # exit 1 when a committed file differs (tests/test_compose.py, test_kubernetes.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from sortformer_triton.proxy import Discovery, ProxySettings, Replica, haproxy_config

ROOT = Path(__file__).resolve().parent
COMPOSE_CFG = ROOT / "haproxy" / "compose.cfg"
K8S_CFG = ROOT / "k8s" / "haproxy.cfg"
COMPOSE_REPLICAS = ("triton-replica-1", "triton-replica-2")
K8S_SERVICE = "triton-replicas"  # the headless Service (deploy/k8s/triton.yaml)
K8S_NAMESPACE = "sortformer"
K8S_MAX_REPLICAS = 8  # server slots; the HorizontalPodAutoscaler's maxReplicas must not exceed it
PROXY_HTTP_PORT, PROXY_GRPC_PORT, PROXY_STATS_PORT = 8000, 8001, 8404
DOCKER_DNS = "127.0.0.11:53"


def rendered() -> Dict[Path, str]:
    listen = dict(bind="0.0.0.0", http_port=PROXY_HTTP_PORT, grpc_port=PROXY_GRPC_PORT, stats_port=PROXY_STATS_PORT)
    return {
        COMPOSE_CFG: haproxy_config([Replica(name, name) for name in COMPOSE_REPLICAS],
                                    ProxySettings(nameserver=DOCKER_DNS, **listen)),
        K8S_CFG: haproxy_config(Discovery(f"{K8S_SERVICE}.{K8S_NAMESPACE}.svc.cluster.local", K8S_MAX_REPLICAS),
                                ProxySettings(**listen)),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    args = ap.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'differs' if args.check else 'wrote'}: {path.relative_to(ROOT.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

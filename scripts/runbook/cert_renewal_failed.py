"""cert_renewal_failed: expiry of the configured certificates and certbot's own view."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import shutil
import subprocess

from scripts import healthcheck as hc
from scripts.runbook._base import Context, Diagnosis, Finding, Fix, main


def diagnose(ctx: Context) -> Diagnosis:
    d = Diagnosis()
    d.add(ctx.checks("certificates"))
    if shutil.which("certbot"):
        out = subprocess.run(["certbot", "certificates"], capture_output=True, text=True, timeout=60, check=False)
        d.checked.append(Finding("certbot", hc.OK if out.returncode == 0 else hc.WARN, out.stdout.strip()[-400:]))
    if d.faults:
        d.cause = "renewal has not happened: certbot's timer, the HTTP-01 challenge (port 80, nginx) or DNS"
        d.next_command = "certbot renew --dry-run; tail -n 50 /var/log/letsencrypt/letsencrypt.log"
        if shutil.which("certbot"):
            # Only a renewal; the deploy hook reloads nginx/broker after nginx -t (see roles).
            d.fixes.append(Fix("renew due certificates now", ["certbot", "renew", "--no-random-sleep-on-renew"]))
    return d


if __name__ == "__main__":
    sys.exit(main("cert_renewal_failed", "Certificate renewal failed or certificates expiring.", diagnose))

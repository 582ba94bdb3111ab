"""What a reconnect storm costs the broker per hash algorithm: CPU time of one password verification
(EMQX rules, ingest.hashing.verify_password) and the single-core time to verify N devices.

    python bench/hash_cost.py [--quick] [--devices 10000]

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import time

from ingest.hashing import HashAlgorithm, generate_password, generate_salt, hash_password, verify_password

SPECS = ["sha256:prefix", "sha512:prefix", "pbkdf2:sha256:4096", "pbkdf2:sha256:100000", "bcrypt:10"]


def per_verify_seconds(spec: str, budget: float) -> tuple[float, int]:
    algo = HashAlgorithm.parse(spec)
    password = generate_password()
    salt = generate_salt(algo)
    stored = hash_password(password, salt, algo)
    n = 0
    start = time.process_time()
    while True:
        assert verify_password(password, stored, salt, algo)
        n += 1
        elapsed = time.process_time() - start
        if elapsed >= budget and n >= 3:
            return elapsed / n, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 0.5 s per algorithm instead of 3 s")
    parser.add_argument("--devices", type=int, default=10_000, help="devices reconnecting at once (default 10000)")
    args = parser.parse_args()
    budget = 0.5 if args.quick else 3.0
    results = {}
    for spec in SPECS:
        seconds, samples = per_verify_seconds(spec, budget)
        results[spec] = {
            "verify_ms": round(seconds * 1000, 4),
            "samples": samples,
            "storm_cpu_seconds": round(seconds * args.devices, 2),
        }
        print(f"{spec:<22} {seconds * 1000:10.4f} ms/verify  {seconds * args.devices:10.2f} CPU-s for {args.devices}")
    print(json.dumps({"devices": args.devices, "algorithms": results}))


if __name__ == "__main__":
    main()

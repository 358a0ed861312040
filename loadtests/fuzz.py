"""Fuzz Governor with schemathesis in positive and negative modes and print what came back.

    python loadtests/fuzz.py --examples 150                      # fake engine: ~1,300 cases
    python loadtests/fuzz.py --url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \
        --admin-key KEY --examples 20                             # a running Governor (real engine)

Every case must hold: no 5xx, every error (in a body or inside a stream) exactly the OpenAI envelope,
every generation body that breaks the schema refused with a 4xx. The schema is built in-process from
the app (Governor serves no /openapi.json by default). Against a real engine, generation lengths are
capped so that valid cases stay short. Exit status 1 when any case broke a rule. Loopback only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fuzz_support, from the repository root

from tests.fuzz_support import ADMIN, MODES, fake_backed_governor, fuzz_all_operations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running Governor (default: start one in front of the fake engine)")
    parser.add_argument("--model", help="the served model name (default: the fake engine's)")
    parser.add_argument("--admin-key", default=ADMIN)
    parser.add_argument("--examples", type=int, default=150, help="cases per operation and mode")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    started = time.monotonic()
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must be a loopback address")
        report = fuzz_all_operations(args.url, args.examples, model=args.model, cap_generation=True,
                                     modes=modes, admin_key=args.admin_key)  # fmt: skip
    else:
        from governor.bench.fake_engine import MODEL

        with fake_backed_governor() as url:
            report = fuzz_all_operations(url, args.examples, model=args.model or MODEL, modes=modes)
    print(report.summary())
    for accepted in report.accepted:
        print("negative body accepted:", accepted)
    print(f"{report.total()} cases in {time.monotonic() - started:.0f} s; 5xx: "
          f"{sum(n for k, n in report.statuses.items() if k.split()[1].startswith('5'))}")  # fmt: skip
    broken = report.violations or report.negative_rejected != report.negative_bodies
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

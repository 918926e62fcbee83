"""Driver of `hearth bench e2b`: one sample of E2B's Python SDK per `go` line on stdin
(Sandbox.create() + commands.run("true") + kill()), timed phase by phase and printed as
one JSON line; `quit` ends it. Configured only by E2B_* variables, as any E2B program.
"""

import json
import sys
import time

from e2b import Sandbox


def sample(template):
    t0 = time.perf_counter()
    sbx = Sandbox.create(template=template, timeout=120)
    t1 = time.perf_counter()
    try:
        sbx.commands.run("true")
        t2 = time.perf_counter()
    finally:
        sbx.kill()
    t3 = time.perf_counter()
    ms = lambda a, b: round((b - a) * 1000, 2)
    return {"create_ms": ms(t0, t1), "run_ms": ms(t1, t2), "kill_ms": ms(t2, t3), "total_ms": ms(t0, t3)}


def main():
    template = sys.argv[1] if len(sys.argv) > 1 else "base"
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            return
        try:
            print(json.dumps(sample(template)), flush=True)
        except Exception as e:  # reported to the bench, which stops
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    main()

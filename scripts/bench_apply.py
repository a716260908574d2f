"""The apply benchmark on its own: a 10-rule policy applied to meta-device ViTs and ResNets of 500 to
94,000 parameter tensors, each time against a bare loop that sets ``requires_grad`` once per
parameter, in the same process. The same as ``python scripts/bench.py apply``.

    python scripts/bench_apply.py            # full sizes, about four minutes on two cores
    python scripts/bench_apply.py --quick    # the two smallest sizes of each family
"""

import sys

from bench import app

if __name__ == "__main__":
    app(["apply", *sys.argv[1:]], prog_name="bench_apply.py")

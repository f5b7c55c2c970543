"""`python -m megatron_ddk.train --config RUN.yaml [--load DIR] [section.field=value ...]`.

The same as `megatron-ddk train`; this is what torchrun and the launch scripts start.
"""

import sys

from megatron_ddk.cli import main

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))

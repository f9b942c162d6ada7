"""``python -m xllm_compiler.serve``: the same as ``xllm-serve``."""

import sys

from xllm_compiler.serve.cli import main

sys.exit(main())

"""``xllm-run OUT_DIR --prompt TEXT | --prompt-ids 1,2,3``: generate with a compiled artifact.

With ``--prompt-ids`` each prompt's new token ids are printed comma-separated on one line of stdout
(scripts rely on that form); with ``--prompt`` the completion text is printed. Also ``python -m
xllm_compiler.run``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from xllm_compiler.console import EXIT_OK, OneLineParser, guarded


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        from xllm_compiler.errors import RequestError

        raise RequestError(f"--prompt-ids must be comma-separated integers, got '{text}'") from None


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="xllm-run", description="Generate tokens with a compiled xllm_compiler artifact.")
    parser.add_argument("artifact", help="folder written by xllm-compile")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a text prompt (needs tokenizer.json)")
    prompts.add_argument("--prompt-ids", action="append", metavar="1,2,3", help="a prompt as token ids")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the eos token")
    parser.add_argument("--device", help="run on this device (default: the artifact's target)")
    parser.add_argument("--kv-blocks", type=int, metavar="N", help="KV-cache blocks in the pool")
    parser.add_argument(
        "--max-memory-utilization", type=float, metavar="F", help="size the KV pool to this share of device memory"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from xllm_compiler import load

        model = load(
            args.artifact,
            device=args.device,
            kv_blocks=args.kv_blocks,
            max_memory_utilization=args.max_memory_utilization,
        )
        as_text = args.prompt is not None
        prompts = [model.encode(p) for p in args.prompt] if as_text else [_ids(p) for p in args.prompt_ids]
        outputs = model.generate(
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
        if model.engine.group.rank == 0:  # under torchrun, one rank speaks for all
            for tokens in outputs:
                print(model.decode(tokens) if as_text else ",".join(map(str, tokens)))
        return EXIT_OK

    return guarded("xllm-run", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

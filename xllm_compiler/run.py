"""``xllm-run OUT_DIR --prompt TEXT | --prompt-ids 1,2,3``: generate with a compiled artifact.

With ``--prompt-ids`` each prompt's new token ids are printed comma-separated on one line of stdout
(scripts rely on that form); with ``--prompt`` the completion text is printed. Prompts are parsed and
the tokenizer checked against the model before any weights are loaded, so that a bad prompt or a
missing or mismatched tokenizer costs no load. Also ``python -m xllm_compiler.run``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xllm_compiler.console import EXIT_OK, OneLineParser, guarded, version_string


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        from xllm_compiler.errors import RequestError

        raise RequestError(f"--prompt-ids must be comma-separated integers, got '{text}'") from None


def manifest_tokenizer(artifact: Path) -> tuple[str | None, int] | None:
    """From ARTIFACT/manifest.json, without loading anything else: the tokenizer file it names (None if
    the checkpoint had none) and the model's vocab_size. None when the manifest cannot be read: load()
    then says what is wrong with it. The one place xllm-run reads the manifest itself."""
    from xllm_compiler.artifact.manifest import read_manifest
    from xllm_compiler.errors import ArtifactError

    try:
        manifest = read_manifest(artifact, verify=False)
    except (ArtifactError, OSError):
        return None
    return manifest.tokenizer, manifest.model.vocab_size


def checked_tokenizer(artifact: Path) -> Any | None:
    """The artifact's tokenizer (a ``tokenizers.Tokenizer``) once it is known to fit the model; None
    when the manifest cannot be read. A RequestError naming --prompt-ids when it is missing or does not fit."""
    from xllm_compiler.errors import RequestError
    from xllm_compiler.tokenizer_check import check_tokenizer

    facts = manifest_tokenizer(artifact)
    if facts is None:
        return None
    name, vocab_size = facts
    if name is None:
        raise RequestError(
            f"the artifact {artifact} has no tokenizer.json (its checkpoint had none): pass token ids with --prompt-ids"
        )
    check = check_tokenizer(Path(artifact) / name, vocab_size)
    if not check.ok:
        raise RequestError(f"{check.problem}; pass token ids with --prompt-ids")
    return check.tokenizer


def add_speculative_options(parser: OneLineParser) -> None:
    """--speculative and --num-speculative-tokens, as xllm-run and xllm-serve take them."""
    parser.add_argument(
        "--speculative",
        metavar="ngram|DRAFT_DIR",
        help="decode speculatively: 'ngram' (prompt lookup) or a draft artifact with the same vocabulary",
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        metavar="K",
        help="--speculative: proposals per verify step (default: the artifact's, else 3)",
    )


def speculative_from_args(args: Any, load: Any) -> Any:
    """What --speculative names: None, "ngram", or the draft artifact, loaded on --device."""
    from xllm_compiler.errors import OptionsError

    if args.speculative in (None, "ngram"):
        return args.speculative
    if not Path(args.speculative).is_dir():
        raise OptionsError(f"--speculative {args.speculative}: not 'ngram' and not an artifact folder")
    return load(args.speculative, device=args.device)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="xllm-run", description="Generate tokens with a compiled xllm_compiler artifact.")
    parser.add_argument("artifact", help="folder written by xllm-compile")
    parser.add_argument("--version", action="version", version=version_string("xllm-run"))
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a text prompt (needs tokenizer.json; repeatable)"
    )
    prompts.add_argument("--prompt-ids", action="append", metavar="1,2,3", help="a prompt as token ids (repeatable)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        metavar="N",
        help="tokens to generate per prompt (default %(default)s)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy (default %(default)s)")
    parser.add_argument(
        "--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass, 1 keeps all (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, metavar="S", help="sampling seed (default: unseeded)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the eos token")
    parser.add_argument("--device", help="run on this device (default: the artifact's target)")
    parser.add_argument(
        "--kv-blocks", type=int, metavar="N", help="KV-cache blocks in the pool (default: sized when loading)"
    )
    parser.add_argument(
        "--max-memory-utilization", type=float, metavar="F", help="size the KV pool to this share of device memory"
    )
    parser.add_argument(
        "--expert-stats",
        metavar="FILE.json",
        help="MoE models: write the tokens routed to each expert of each layer here (the input of --expert-placement)",
    )
    add_speculative_options(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from xllm_compiler import load
        from xllm_compiler.errors import OptionsError

        as_text = args.prompt is not None
        tokenizer = checked_tokenizer(Path(args.artifact)) if as_text else None
        prompts = None if as_text else [_ids(p) for p in args.prompt_ids]
        stats_file = Path(args.expert_stats) if args.expert_stats else None
        if stats_file is not None and not stats_file.parent.is_dir():
            raise OptionsError(f"--expert-stats {stats_file}: folder {stats_file.parent} does not exist")
        model = load(
            args.artifact,
            device=args.device,
            kv_blocks=args.kv_blocks,
            max_memory_utilization=args.max_memory_utilization,
        )
        speculative = speculative_from_args(args, load)
        if as_text:
            tokenizer = tokenizer or model.tokenizer  # None only if load() read a manifest we could not
            prompts = [tokenizer.encode(p).ids for p in args.prompt]
        outputs = model.generate(
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            speculative=speculative,
            num_speculative_tokens=args.num_speculative_tokens,
        )
        if model.engine.group.rank == 0:  # under torchrun, one rank speaks for all
            for tokens in outputs:
                print(tokenizer.decode(tokens) if tokenizer is not None else ",".join(map(str, tokens)))
            if stats_file is not None:
                stats_file.write_text(json.dumps(model.expert_stats()) + "\n")
        return EXIT_OK

    return guarded("xllm-run", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

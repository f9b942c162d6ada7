"""CompileOptions: every knob of ``xllm-compile`` / ``xllm_compiler.compile``, validated in one place."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xllm_compiler.errors import OptionsError
from xllm_compiler.ops.quant import DEFAULT_GROUP_SIZE, GROUP_SIZES

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu")
QUANTIZE_CHOICES = ("none", "int8", "int4")
DEFAULT_DECODE_BUCKETS = (1, 2, 4, 8)
DEFAULT_PREFILL_BUCKETS = (32, 64, 128, 256, 512)
#: --max-seq-len defaults to the model's max_position_embeddings, capped here: the KV pool and rope
#: tables are sized from it, and 128k-context checkpoints would otherwise reserve gigabytes.
MAX_SEQ_LEN_CAP = 4096
DEFAULT_BLOCK_SIZE = 16
#: Tensor-parallel bucket graphs of at least this many tokens run as two micro-batches (the default of
#: passes/comm/split_micro_batches.py). Measured with tools/tp_overlap.py (TP=2, gloo, 2 CPU cores): a
#: split step was slower than a whole one at 32 and 128 tokens, decode or prefill (twice the collectives,
#: each with its fixed cost, and half-size GEMMs); at 512 it hid a median 70% of the time blocked in
#: all-reduce waits and was faster in 3 runs of 4.
DEFAULT_MICRO_BATCH_MIN_TOKENS = 256


@dataclass(frozen=True)
class CompileOptions:
    """Options of one compile."""

    dtype: str = "auto"
    """Weights and activations dtype; 'auto' keeps the checkpoint's (float32 when it names none)."""
    device: str = "auto"
    """Target device recorded in the artifact (and load()'s default); it must be available here."""
    decode_buckets: tuple[int, ...] | None = None
    """Decode batch sizes to specialise graphs for; None means DEFAULT_DECODE_BUCKETS."""
    prefill_buckets: tuple[int, ...] | None = None
    """Prefill token counts to specialise graphs for; None means DEFAULT_PREFILL_BUCKETS up to max_seq_len."""
    max_seq_len: int | None = None
    """Longest prompt + generation; None means max_position_embeddings, capped at MAX_SEQ_LEN_CAP."""
    force: bool = False
    """Replace a non-empty out_dir."""
    passes: tuple[str, ...] | None = None
    """Run only these passes (pipeline order kept); None runs all, () or ('none',) runs none."""
    disable_passes: tuple[str, ...] = ()
    """Passes to skip."""
    verify: bool = False
    """Run each pass's graph on sample inputs and compare with the graph before it."""
    block_size: int | None = None
    """Tokens per KV-cache block; None means the target platform's default: DEFAULT_BLOCK_SIZE, or the
    smallest multiple its paged-attention kernels take (128 on npu)."""
    debug_dump: str | None = None
    """Folder to write the graph's code to before and after every pass."""
    buckets_from: str | None = None
    """A JSONL trace of step shapes; buckets are chosen to minimise its expected padding."""
    num_buckets: int | None = None
    """With buckets_from: buckets per phase (default: as many as the default series has)."""
    cache_dir: str | None = None
    """Compile cache folder; None means the default (see xllm_compiler.cache), '' disables it."""
    cache_max_bytes: int | None = None
    """Compile cache size limit; None means $XLLM_CACHE_MAX_SIZE, else 20 GiB (xllm_compiler.cache)."""
    tp: int = 1
    """Tensor-parallel degree: one weights file per rank; run with torchrun --nproc-per-node tp."""
    ep: int = 1
    """Expert-parallel degree (MoE models): rank r holds experts [r*E/ep, (r+1)*E/ep), the rest is
    replicated (models/parallel.py); one weights file per rank; run with torchrun --nproc-per-node ep."""
    expert_placement: str | None = None
    """With ep: a STATS.json (``xllm-run --expert-stats``) to plan the experts' placement from
    (xllm_compiler/experts); None places them contiguously, one replica each."""
    redundant_experts: int = 0
    """With expert_placement: extra physical expert slots per MoE layer, holding replicas of the hottest."""
    micro_batch_min_tokens: int = DEFAULT_MICRO_BATCH_MIN_TOKENS
    """Tensor-parallel bucket graphs of at least this many tokens run as two overlapped micro-batches."""
    num_speculative_tokens: int = 0
    """Proposals a speculative verify step checks per sequence (k); k > 0 adds verify buckets of b·(k+1)
    rows for each decode batch size b (xllm_compiler/buckets/policy.py), and is generate()'s default k."""
    quantize: str | None = None
    """Weight quantization of the linear layers: 'int8' (symmetric, per output channel, float32 scales),
    'int4' (asymmetric, per group of ``group_size`` inputs; passes/quant/quantize_linear_weights.py); None
    keeps the weights in ``dtype``."""
    quantize_lm_head: bool = True
    """With quantize: the LM head too (25% of a decode step's weight bytes on the ~100M Llama)."""
    group_size: int | None = None
    """With quantize 'int4': inputs per scale and offset, one of ops/quant.py's GROUP_SIZES
    (DEFAULT_GROUP_SIZE when not given); None for any other scheme."""


def bucket_list(values: Iterable[int] | str | None, what: str) -> tuple[int, ...] | None:
    """Parse/validate a bucket list ('1,2,4' or [1, 2, 4]) into sorted unique positive ints."""
    if values is None:
        return None
    if isinstance(values, str):
        parts = [p.strip() for p in values.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise OptionsError(f"{what} must be comma-separated integers, got '{values}'") from None
    values = list(values)
    if not values:
        raise OptionsError(f"{what} must name at least one size")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OptionsError(f"{what} must be positive integers, got {v!r}")
    return tuple(sorted(set(values)))


def make_options(**kwargs) -> CompileOptions:
    """CompileOptions from API keywords, each checked and normalised; unknown keywords are refused."""
    known = set(CompileOptions.__dataclass_fields__)
    unknown = set(kwargs) - known - {"disable_pass"}
    if unknown:
        raise OptionsError(f"unknown compile option {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    if "disable_pass" in kwargs:
        kwargs["disable_passes"] = kwargs.pop("disable_pass")
    dtype = kwargs.get("dtype", "auto")
    if dtype not in DTYPE_CHOICES:
        raise OptionsError(f"dtype '{dtype}' is not one of {', '.join(DTYPE_CHOICES)}")
    device = kwargs.get("device", "auto")
    if device not in DEVICE_CHOICES:
        raise OptionsError(f"device '{device}' is not one of {', '.join(DEVICE_CHOICES)}")
    max_seq_len = kwargs.get("max_seq_len")
    if max_seq_len is not None and (
        isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1
    ):
        raise OptionsError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    block_size = kwargs.get("block_size")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise OptionsError(f"block_size must be a positive integer, got {block_size!r}")
    passes = kwargs.get("passes")
    if isinstance(passes, str):
        passes = tuple(p.strip() for p in passes.split(",") if p.strip())
    disabled = kwargs.get("disable_passes", ())
    if isinstance(disabled, str):
        disabled = (disabled,)
    quantize = _quantize_scheme(kwargs.get("quantize"))
    return CompileOptions(
        dtype=dtype,
        device=device,
        decode_buckets=bucket_list(kwargs.get("decode_buckets"), "decode_buckets"),
        prefill_buckets=bucket_list(kwargs.get("prefill_buckets"), "prefill_buckets"),
        max_seq_len=max_seq_len,
        force=bool(kwargs.get("force", False)),
        passes=tuple(passes) if passes is not None else None,
        disable_passes=tuple(disabled),
        verify=bool(kwargs.get("verify", False)),
        block_size=block_size,
        debug_dump=None if kwargs.get("debug_dump") is None else str(kwargs["debug_dump"]),
        buckets_from=None if kwargs.get("buckets_from") is None else str(kwargs["buckets_from"]),
        num_buckets=_positive_or_none(kwargs.get("num_buckets"), "num_buckets"),
        cache_dir=None if kwargs.get("cache_dir") is None else str(kwargs["cache_dir"]),
        cache_max_bytes=_positive_or_none(kwargs.get("cache_max_bytes"), "cache_max_bytes"),
        tp=_positive_or_none(kwargs.get("tp", 1), "tp"),
        ep=_positive_or_none(kwargs.get("ep", 1), "ep"),
        expert_placement=None if kwargs.get("expert_placement") is None else str(kwargs["expert_placement"]),
        redundant_experts=_non_negative(kwargs.get("redundant_experts", 0), "redundant_experts"),
        micro_batch_min_tokens=_positive_or_none(
            kwargs.get("micro_batch_min_tokens", DEFAULT_MICRO_BATCH_MIN_TOKENS), "micro_batch_min_tokens"
        ),
        num_speculative_tokens=_non_negative(kwargs.get("num_speculative_tokens", 0), "num_speculative_tokens"),
        quantize=quantize,
        quantize_lm_head=bool(kwargs.get("quantize_lm_head", True)),
        group_size=_group_size(quantize, kwargs.get("group_size")),
    )


def _quantize_scheme(value) -> str | None:
    """'int8' or 'int4' as asked; None or 'none' for no quantization; anything else refused by name."""
    if value is None or value == "none":
        return None
    if value not in QUANTIZE_CHOICES:
        raise OptionsError(f"quantize '{value}' is not a supported scheme (supported: {', '.join(QUANTIZE_CHOICES)})")
    return value


def _group_size(quantize: str | None, value) -> int | None:
    """int4's group size (DEFAULT_GROUP_SIZE unless given); one given with any other scheme, or off the
    choices, refused by name."""
    if quantize != "int4":
        if value is not None:
            raise OptionsError(f"group_size {value!r} is for quantize 'int4' only, got quantize {quantize or 'none'!r}")
        return None
    if value is None:
        return DEFAULT_GROUP_SIZE
    if isinstance(value, bool) or value not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES))
        raise OptionsError(f"group_size must be one of {sizes}, got {value!r}")
    return value


def _non_negative(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionsError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _positive_or_none(value, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionsError(f"{what} must be a positive integer, got {value!r}")
    return value
